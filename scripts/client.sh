#!/usr/bin/env bash
# The users' habit: scripts/client.sh IMAGE_DIR_OR_FILE VIZ_DIR [deep-detection client flags...]
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 IMAGE_DIR_OR_FILE VIZ_DIR [deep-detection client flags, e.g. --server HOST:PORT]" >&2
  exit 2
fi
images="$1"; viz="$2"; shift 2
if command -v deep-detection >/dev/null 2>&1; then
  exec deep-detection client "$images" --viz "$viz" "$@"
fi
# Not pip-installed: run the package from this checkout.
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
exec python3 -m dd client "$images" --viz "$viz" "$@"
