#!/usr/bin/env bash
# The users' habit: scripts/launch.sh PATH_NODE_CONFIG_FILE [serve flags...]
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 PATH/TO/node_config.json|MODEL_FOLDER [deep-detection serve flags]" >&2
  exit 2
fi
exec deep-detection serve "$@"
