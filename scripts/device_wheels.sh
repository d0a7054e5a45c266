#!/usr/bin/env bash
# Downloads into .whl/ (or $1) the wheels that a bare GPU machine without network lacks for this project's
# scripts (scripts/gpu_host_path.sh, gpu_detectron2_parity.sh; the GPU tests): CPython 3.12, x86-64 Linux.
# Run on a machine with PyPI; carry the folder to the GPU machine, where the scripts install it with
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
# The versions are those the session 11 runs used (BENCHMARKS.md); --no-deps: each one needed is named.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
mkdir -p "$DEST"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
  --platform manylinux1_x86_64 -d "$DEST" \
  pyzmq==27.1.0 prometheus-client==0.21.1 nvidia-ml-py==12.570.86 zstandard==0.25.0 isal==1.9.1 \
  pycocotools==2.0.8 grpcio-health-checking==1.66.2 grpcio-reflection==1.66.2 \
  pytest==8.3.4 pluggy==1.5.0 iniconfig==2.0.0 pytest-timeout==2.3.1 hypothesis==6.122.3 \
  sortedcontainers==2.4.0 attrs==24.3.0 py-spy==0.4.3
ls "$DEST"
