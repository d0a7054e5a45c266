#!/usr/bin/env bash
# Regenerates dd/proto/ from protos/. A test (tests/integration/test_protos.py) fails when
# the checked-in code is stale, so run this after every .proto change.
#
# The generator is pinned: protobuf's generated code refuses (at import) a runtime
# older than the protoc that made it, and gRPC's refuses an older grpcio. grpcio-tools
# 1.66.2 (protoc 27.2) makes code that runs on protobuf >= 5.27.2 and grpcio >= 1.66.2,
# setup.cfg's floors (.ci/lowest-pins.txt), and on every newer release up to protobuf 7.
# Run it with a Python that has exactly that grpcio-tools:
#   python3 -m venv /tmp/dd-protoc && /tmp/dd-protoc/bin/pip install grpcio-tools==1.66.2
#   PYTHON=/tmp/dd-protoc/bin/python scripts/compile_protos.sh
set -euo pipefail
cd "$(dirname "$0")/.."
GRPCIO_TOOLS=1.66.2
py="${PYTHON:-python3}"
have=$("$py" -c 'from importlib.metadata import version; print(version("grpcio-tools"))' 2>/dev/null || echo none)
if [ "$have" != "$GRPCIO_TOOLS" ]; then
  cat >&2 <<MSG
scripts/compile_protos.sh: needs grpcio-tools==$GRPCIO_TOOLS, but $py has ${have/none/none installed}.
Code from a newer generator would not import on the oldest protobuf/grpcio setup.cfg allows. Use:
  python3 -m venv /tmp/dd-protoc && /tmp/dd-protoc/bin/pip install grpcio-tools==$GRPCIO_TOOLS
  PYTHON=/tmp/dd-protoc/bin/python scripts/compile_protos.sh
MSG
  exit 2
fi
echo "compile_protos: grpcio-tools $GRPCIO_TOOLS ($py)"
out=dd/proto
rm -rf "$out"
mkdir -p "$out"
"$py" -m grpc_tools.protoc -Iprotos --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  $(cd protos && find . -name '*.proto' | sort | sed 's|^\./||')
# Generated imports are absolute ("from deep_detection.v1 import ..."); make them
# package-relative so the code lives inside `dd` without touching sys.path.
find "$out" -name '*.py' -print0 | xargs -0 sed -i -E 's/^from deep_detection\.(.*) import /from dd.proto.deep_detection.\1 import /'
find "$out" \( -name '*.py' -o -name '*.pyi' \) -print0 | \
  xargs -0 sed -i -E 's/^from inference(\.[A-Za-z0-9_.]+)? import /from dd.proto.inference\1 import /'
for d in $(find "$out" -type d); do
  [ -f "$d/__init__.py" ] || echo '"""Generated from protos/ by scripts/compile_protos.sh; do not edit."""' > "$d/__init__.py"
done
