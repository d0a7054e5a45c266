#!/usr/bin/env bash
# The GPU parity check of issues #13 and #18 in one command, on a bare GPU machine (one H200, 16 cores).
#
#   1. installs the missing Python packages from wheels in .whl/ into /tmp/site (no network) and puts
#      detectron2's source (.d2/detectron2, never committed) on PYTHONPATH;
#   2. trains a detectron2 Mask R-CNN R50-FPN, RGB-D, from scratch with detectron2's own trainer for
#      TRAIN_MIN minutes (scripts/train_detectron2.py) into $MODEL, a users'-style folder, and writes
#      detectron2's DefaultPredictor answers (GPU, fp32, TF32 off) on REF_SCENES held-out 1280x720 scenes;
#   3. tests.parity on those scenes: the fast GPU engine (fp16, the default; and fp16 off) and the CPU
#      reference engine against the CPU engine and against detectron2 itself (issue #13's bounds, and the
#      pairs matched at box IoU >= 0.98 for issue #18);
#   4. scripts/bench_engine.py on the folder: fast vs the detectron2 eager engine, timed and checked;
#   5. if time is left: fast with fp16 off and TF32 off (NVIDIA_TF32_OVERRIDE=0) against detectron2.
# Every step is time-boxed so that the whole stays under DEADLINE_S (default 565 s). Everything lands in
# $OUT (at most 8 files): run.log, summary.md, train_info.json, parity.json, bench_engine.json,
# parity_fp32_notf32.json, model_folder.tar.gz (the folder without weights and images).
#
# On the GPU machine, from the repository root (carry .whl and .d2):
#   bash scripts/gpu_detectron2_parity.sh
# CPU smoke test of the same steps (tiny model, 2 steps, 2 scenes, CPU engines; bench skipped), e.g. with a
# clean Python 3.11 venv and the 3.11 builds of the wheels:
#   SMOKE=1 PY=/tmp/cleanvenv/bin/python WHL=/tmp/whl311 OUT=/tmp/smoke-out bash scripts/gpu_detectron2_parity.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/d2parity-out}
SMOKE=${SMOKE:-0}
PY=${PY:-python3}
WHL=${WHL:-.whl}
SITE=${SITE:-/tmp/site}
MODEL=${MODEL:-/tmp/d2rgbd}
KIND=${KIND:-rgbd}
TRAIN_MIN=${TRAIN_MIN:-3.5}
REF_SCENES=${REF_SCENES:-32}
DEADLINE_S=${DEADLINE_S:-565}
mkdir -p "$OUT"
T0=$(date +%s)

source scripts/timebox.sh  # elapsed, left, budget, step

main() {
  echo "gpu_detectron2_parity.sh: SMOKE=$SMOKE MODEL=$MODEL KIND=$KIND TRAIN_MIN=$TRAIN_MIN REF_SCENES=$REF_SCENES" \
       "DEADLINE_S=$DEADLINE_S; $(nproc) cores; $(date -u +%FT%TZ)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

  # 1. packages
  step install "$(budget 60 400)" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
       --target "$SITE" "$WHL"/*.whl || return 1
  if [ ! -d .d2/detectron2 ]; then echo "no .d2/detectron2: copy detectron2's source package there (carry .d2)"; return 1; fi
  export PYTHONPATH="$SITE:$PWD/.d2:$PWD"
  "$PY" -c "import torch, torchvision, detectron2, fvcore, pycocotools; print('python', __import__('sys').version.split()[0],
'torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available(),
'detectron2', detectron2.__version__, 'from', detectron2.__file__)" || return 1

  local train_args=(--out "$MODEL" --kind "$KIND" --reference-scenes "$REF_SCENES" --check-scenes "$REF_SCENES")
  # one CUDA graph, captured at load for the scenes' size (the default would also capture MIN_SIZE squares
  # for batch buckets 1, 2, 4: answers are the same, loads slower); each image on its own padded size
  # (exact_canvases), as detectron2 runs it, and no other canvas captured
  local g='"warmup_sizes": [[720, 1280]], "batch_buckets": [1], "exact_canvases": true'
  local cands=(--candidate "fast:cuda:{$g}" --candidate "fast:cuda:{$g, \"fp16\": false}" --candidate default:cpu)
  local fp32_cand="fast:cuda:{$g, \"fp16\": false}"
  if [ "$SMOKE" = 1 ]; then
    train_args=(--out "$MODEL" --kind "$KIND" --device cpu --iters 2 --tiny --batch 2 --workers 2 --log-every 1
                --reference-scenes 2 --check-scenes 2 --test-size 320x180)
    cands=(--candidate 'fast:cpu:{"allow_cpu": true, "exact_canvases": true}'
           --candidate 'fast:cpu:{"allow_cpu": true, "fp16": false, "exact_canvases": true}' --candidate default:cpu)
    fp32_cand='fast:cpu:{"allow_cpu": true, "fp16": false, "exact_canvases": true}'
  else
    train_args+=(--device cuda --minutes "$TRAIN_MIN")
  fi

  # 2. training (and detectron2's own answers on the held-out scenes)
  step train "$(budget 330 200)" "$PY" scripts/train_detectron2.py "${train_args[@]}"
  local rc=$?
  [ -f "$MODEL/train_info.json" ] && cp "$MODEL/train_info.json" "$OUT/"
  if [ -f "$MODEL/node_config.json" ]; then
    tar -czf "$OUT/model_folder.tar.gz" -C "$(dirname "$MODEL")" --exclude='*.pth' --exclude=images "$(basename "$MODEL")"
  fi
  if (( rc != 0 )) || [ ! -f "$MODEL/expected.json" ]; then echo "training did not finish: nothing to compare"; return 1; fi
  "$PY" -m dd inspect "$MODEL"

  # 3. parity: each engine runs once on the stored scenes; every candidate against every reference
  step parity "$(budget 220 70)" "$PY" -m tests.parity "$MODEL" --reference default:cpu --reference expected \
       "${cands[@]}" --json "$OUT/parity.json"

  # 4. engine timing and fast-vs-eager check on the trained folder
  if [ "$SMOKE" = 1 ]; then
    echo "[$(elapsed) s] == bench: skipped in SMOKE mode (needs CUDA)"
  else
    step bench "$(budget 120 0)" "$PY" scripts/bench_engine.py --model "$MODEL" --sizes 640 --dets 100 \
         --batches 1 8 --engines eager-fp32 fast --seconds 2 --check --fast-options '{"batch_buckets": [1, 8]}' \
         --json "$OUT/bench_engine.json"
  fi

  # 5. fp16 off and TF32 off (cuDNN / cuBLAS honour NVIDIA_TF32_OVERRIDE) against detectron2 fp32, if time is left
  step parity_fp32_notf32 "$(budget 90 0)" env NVIDIA_TF32_OVERRIDE=0 "$PY" -m tests.parity "$MODEL" \
       --reference expected --candidate "$fp32_cand" --json "$OUT/parity_fp32_notf32.json"
  return 0
}

summary() {
  PYTHONPATH="$PWD" "$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
lines = ["# detectron2 R50-FPN trained on dd.synth: GPU parity (issues #13, #18)", ""]
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.is_file() else None
info = load("train_info.json")
if info:
    t = info["training"]
    lines.append(f"training: {t['steps']} steps x {info['settings']['batch']} scenes in {t['train_s']:.0f} s "
                 f"({t['images_per_s'] or 0:.1f} scenes/s) on {info['device_name']}, torch {info['torch']}; final losses "
                 + ", ".join(f"{k} {v:.3g}" for k, v in sorted(t["final_median_losses"].items())))
    c = info.get("held_out_check")
    if c:
        lines.append("held-out scenes (detectron2 DefaultPredictor, fp32): " + ", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in c.items()))
    lines.append("")
for name in ("parity.json", "parity_fp32_notf32.json"):
    recs = load(name)
    if not recs:
        continue
    lines += [f"## {name}", "", "| candidate | reference | passes | matched | confident unmatched ref/cand | "
              "corner p99 px | score diff max | mask IoU mean | matched at IoU 0.98 | s/image |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        m, s = r["metrics"], r["strict"]
        f = lambda v, fmt: "n/a" if v is None else format(v, fmt)
        t = (r.get("timings") or {}).get(r["candidate"]) or {}
        lines.append(f"| `{r['candidate']}` | `{r['reference']}` | {'yes' if r['passes'] else 'NO'} | "
                     f"{m['matched']}/{m['reference_detections']} | {len(m['reference_confident_unmatched'])}/"
                     f"{len(m['candidate_confident_unmatched'])} | {f(m['box_corner_dev_p99_px'], '.3f')} | "
                     f"{f(m['score_diff_max'], '.4f')} | {f(m['mask_iou_mean'], '.4f')} | "
                     f"{s['matched']}/{m['reference_detections']} | {f(t.get('s_per_image'), '.3f')} |")
        for line in r["failures"]:
            lines.append(f"  - {line}")
    lines.append("")
bench = load("bench_engine.json")
if bench:
    lines += [f"## bench_engine.json ({bench['device']})", "", "| engine | side | dets | batch | p50 ms | p99 ms | images/s |",
              "|---|---|---|---|---|---|---|"]
    for r in bench["rows"]:
        lines.append(f"| {r['engine']} | {r['shorter_side']} | {r['detections']} | {r['batch']} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['images_per_s']:.0f} |")
    for c in bench["checks"]:
        lines.append("check: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in c.items()))
text = "\n".join(lines) + "\n"
(out / "summary.md").write_text(text)
print(text)
EOF
}

{
  main
  rc=$?
  echo "[$(elapsed) s] == done (main exit $rc)"
  summary
  exit $rc
} 2>&1 | tee "$OUT/run.log"
exit "${PIPESTATUS[0]}"
