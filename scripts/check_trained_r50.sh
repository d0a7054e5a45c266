#!/usr/bin/env bash
# Issue #18, "Also": train an R50-FPN (RGB-D, 4 channels) from scratch on dd.synth scenes for a few minutes,
# then check the fast engine against eager fp32 on held-out 1280x720 scenes (>= 99% of instances matched with
# box IoU >= 0.98 and mask IoU >= 0.95). One command, everything under OUT_DIR:
#
#   train.log        the training run (scripts/train_demo.py --arch r50)
#   model/           the model folder (node_config.json, model.pth, categories.txt, train_info.json): it loads
#                    in the server like any model folder
#   check.json       summary, settings and every pair (scripts/fast_eager_check.py)
#   check.log, check.md, summary.md (the training report and the check's table, in markdown)
#
#   scripts/check_trained_r50.sh OUT_DIR [MINUTES]        (MINUTES of training, default 4)
#
# Plain bash + python: run from the repository root or anywhere (it finds the repository from its own path),
# with PYTHONPATH set by the caller where the package is not installed. Settings from the environment:
#   PYTHON (python3), DEVICE (cuda:0), CHECK_SCENES (64), WIDTH/HEIGHT (1280/720: scenes trained and checked),
#   BATCH (8), MIN_SIZE (512; MAX_SIZE 1333), WORKERS (cores - 2), TRAIN_ARGS / CHECK_ARGS (appended as they are;
#   e.g. the CPU smoke run in BENCHMARKS.md). Exit status: 0 PASS, 1 FAIL, anything else: an error.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 OUT_DIR [MINUTES]" >&2
    exit 2
fi
OUT=$1
MINUTES=${2:-4}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda:0}
CHECK_SCENES=${CHECK_SCENES:-64}
WIDTH=${WIDTH:-1280}
HEIGHT=${HEIGHT:-720}
BATCH=${BATCH:-8}
MIN_SIZE=${MIN_SIZE:-512}
CORES=$(nproc 2>/dev/null || echo 4)
WORKERS=${WORKERS:-$(( CORES > 3 ? CORES - 2 : 1 ))}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
cd "$REPO"

# Fail in seconds, not after the training, when the check cannot run here.
"$PYTHON" -c "import torch, torchvision, cv2, pycocotools, dd.worker.engines.fast.engine" || {
    echo "error: the check needs torch, torchvision, opencv, pycocotools and this repository importable" \
         "(PYTHONPATH=$REPO, and pycocotools carried as a wheel where it is not installed)" >&2
    exit 2
}
{ echo "# $(date -u +%FT%TZ) $(git rev-parse HEAD 2>/dev/null || echo no-git) on $DEVICE"; df -h /dev/shm 2>/dev/null || true; } \
    > "$OUT/train.log"

AMP=()
if [[ $DEVICE == cuda* ]]; then
    # bf16 backbone + channels-last + cuDNN autotuning of the backbone (one input shape: all scenes are WIDTHxHEIGHT)
    AMP=(--amp --channels-last --cudnn-benchmark)
fi
# shellcheck disable=SC2086  # TRAIN_ARGS / CHECK_ARGS are word lists on purpose
"$PYTHON" scripts/train_demo.py --arch r50 --kind rgbd --out "$OUT/model" --device "$DEVICE" \
    --minutes "$MINUTES" --batch "$BATCH" --width "$WIDTH" --height "$HEIGHT" --min-size "$MIN_SIZE" --max-size 1333 \
    --workers "$WORKERS" --bn-scenes 64 --val-count 32 --log-every 20 ${AMP[@]+"${AMP[@]}"} ${TRAIN_ARGS:-} 2>&1 \
    | tee -a "$OUT/train.log"

set +e
# shellcheck disable=SC2086
"$PYTHON" scripts/fast_eager_check.py --model "$OUT/model" --scenes "$CHECK_SCENES" --width "$WIDTH" \
    --height "$HEIGHT" --device "$DEVICE" --json "$OUT/check.json" --md "$OUT/check.md" ${CHECK_ARGS:-} 2>&1 \
    | tee "$OUT/check.log"
rc=${PIPESTATUS[0]}
set -e

{
    echo "# Trained R50-FPN: fast engine vs eager fp32"
    echo
    echo "Training (scripts/train_demo.py --arch r50, $MINUTES min budget; the full log is train.log):"
    echo
    echo '```'
    sed -n '/^== report ==/,$p' "$OUT/train.log"
    echo '```'
    echo
    cat "$OUT/check.md" 2>/dev/null || echo "(no check.md: see check.log)"
} > "$OUT/summary.md"
echo "written: $OUT/{train.log,model/,check.json,check.log,check.md,summary.md}; check exit status $rc"
exit "$rc"
