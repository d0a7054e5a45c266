#!/usr/bin/env bash
# Regenerates dd/proto/ from protos/. A test (tests/test_protos.py) fails when
# the checked-in code is stale, so run this after every .proto change.
set -euo pipefail
cd "$(dirname "$0")/.."
out=dd/proto
rm -rf "$out"
mkdir -p "$out"
"${PYTHON:-python3}" -m grpc_tools.protoc -Iprotos --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  $(cd protos && find . -name '*.proto' | sort | sed 's|^\./||')
# Generated imports are absolute ("from deep_detection.v1 import ..."); make them
# package-relative so the code lives inside `dd` without touching sys.path.
find "$out" -name '*.py' -print0 | xargs -0 sed -i -E 's/^from deep_detection\.(.*) import /from dd.proto.deep_detection.\1 import /'
for d in $(find "$out" -type d); do
  [ -f "$d/__init__.py" ] || echo '"""Generated from protos/ by scripts/compile_protos.sh; do not edit."""' > "$d/__init__.py"
done
