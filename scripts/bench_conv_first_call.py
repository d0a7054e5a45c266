#!/usr/bin/env python3
"""What a convolution costs at its first call at a new shape, against its second: cuDNN against PyTorch's
native depthwise kernel (dd/worker/engines/fast/depthwise.py).

Every CUDA-graph capture of the fast engine runs the network at shapes new to the process (each batch
bucket and canvas). A convolution whose first call at a shape is slow makes every capture slow: on an
H200 (run S9-1), cuDNN took 157-490 ms for a depthwise convolution's first call at each shape in half
precision or channels-last (0.1 ms the second time), which made each capture of the MobileNetV3 demo
model take about 2 s. This script times, in one fresh process, the first and second call of plain and
depthwise convolutions at two shapes each, in fp16 and fp32, channels-last or not, and the depthwise ones
also on the native kernel.

    python scripts/bench_conv_first_call.py                 # CUDA
    python scripts/bench_conv_first_call.py --device cpu    # smoke run (no cuDNN)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--channels", type=int, default=64)
    args = ap.parse_args()

    import torch
    import torch.nn as nn

    from dd.worker.engines.fast.depthwise import native_depthwise

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; use --device cpu for a smoke run", file=sys.stderr)
        return 2

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def first_second(conv: nn.Module, x: torch.Tensor) -> tuple[float, float]:
        times = []
        for _ in range(2):
            sync()
            t = time.perf_counter()
            with torch.inference_mode():
                conv(x)
            sync()
            times.append((time.perf_counter() - t) * 1e3)
        return times[0], times[1]

    torch.zeros(1, device=dev)  # the context and the first kernel, outside the table
    with torch.inference_mode():  # cuDNN's own set-up, outside the table
        nn.Conv2d(8, 8, 3, padding=1).to(dev)(torch.zeros(1, 8, 8, 8, device=dev))
    c = args.channels
    shapes = ((96, 128), (100, 132))
    print(f"first and second call, ms, on {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'the CPU'}, "
          f"torch {torch.__version__}, batch 2, {c} channels")
    print("| convolution | dtype | layout | path | " + " | ".join(f"{h}x{w} first / second" for h, w in shapes) + " |")
    print("|---|---|---|---|" + "---|" * len(shapes))
    for dtype in (torch.float16, torch.float32):
        if dev.type == "cpu" and dtype == torch.float16:
            continue
        for channels_last in (True, False):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            for name, groups, k in (("1x1", 1, 1), ("3x3", 1, 3), ("depthwise 3x3", c, 3), ("depthwise 5x5", c, 5)):
                paths = ["default"] + (["native depthwise"] if groups > 1 and dev.type == "cuda" else [])
                for path in paths:
                    # a fresh module and fresh shapes per row: every first call is a first call
                    conv = nn.Conv2d(c, c, k, padding=k // 2, groups=groups).to(dev, dtype).to(memory_format=fmt)
                    if path != "default":
                        native_depthwise(conv)
                    cells = []
                    for h, w in shapes:
                        hh, ww = h + 2 * groups + k + (4 if path != "default" else 0), w  # a shape new to this row
                        x = torch.randn(2, c, hh, ww, device=dev, dtype=dtype).contiguous(memory_format=fmt)
                        a, b = first_second(conv, x)
                        cells.append(f"{a:.1f} / {b:.2f}")
                    print(f"| {name} | {str(dtype).split('.')[-1]} | {'channels-last' if channels_last else 'NCHW'} "
                          f"| {path} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
