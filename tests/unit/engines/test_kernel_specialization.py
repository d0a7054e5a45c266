"""One compilation of each Triton kernel serves every input size (issue #18): no kernel argument that follows
the input size, the batch or the number of boxes is specialized (kernels/specialization.py lists them, each
with its reason), and launches at sizes that divide differently by 16, with odd and even counts and
levels one pixel wide, produce one specialization key per kernel (run in Triton's interpreter on the CPU;
the key is computed with Triton's own specialization function and each kernel's do_not_specialize)."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from dd.worker.engines.kernels import specialization  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
MODULES = ("roi_align", "suppression", "paste", "rle", "channels_last", "fixed_rle")


def kernels() -> dict[str, object]:
    """Every launched kernel of the kernels package ("module:function"): the jitted functions named *_kernel
    (the others are device functions they call)."""
    found = {}
    for name in MODULES:
        module = importlib.import_module(f"dd.worker.engines.kernels.{name}")
        for attr, value in vars(module).items():
            if attr.endswith("_kernel") and hasattr(value, "fn"):
                found[f"{name}:{attr}"] = value
    return found


def runtime_args(kernel: object) -> list[str]:
    """The kernel's non-constexpr arguments."""
    return [p.name for p in inspect.signature(kernel.fn).parameters.values()  # type: ignore[attr-defined]
            if "constexpr" not in str(p.annotation)]


def test_every_kernel_argument_is_classified_and_size_arguments_are_not_specialized() -> None:
    found = kernels()
    assert set(found) == set(specialization.NOT_SPECIALIZED) | set(specialization.SPECIALIZED), (
        "kernels/specialization.py must list every kernel")
    for name, kernel in found.items():
        dynamic = specialization.NOT_SPECIALIZED.get(name, {})
        kept = specialization.SPECIALIZED.get(name, {})
        assert not set(dynamic) & set(kept), name
        assert set(runtime_args(kernel)) == set(dynamic) | set(kept), (
            f"{name}: classify each argument in kernels/specialization.py")
        marked = specialization.not_specialized(kernel)
        assert set(dynamic) <= marked, f"{name} specializes {sorted(set(dynamic) - marked)}: they follow the size"
        assert not set(kept) & marked, f"{name}: {sorted(set(kept) & marked)} are listed as specialized"
        assert all(reason.strip() for reason in (*dynamic.values(), *kept.values())), name


# Launches recorded in the interpreter: each kernel's launch is replaced by one that notes the specialization
# key (types, == 1 / % 16 / alignment, constexprs and launch options) and then runs the kernel.
SCRIPT = r"""
import json
import numpy as np
import torch
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import native_specialize_impl

from dd.worker.engines import masks
from dd.worker.engines.kernels import channels_last, fixed_rle, paste, rle, roi_align, suppression
from dd.worker.engines.kernels.specialization import not_specialized

keys = {}


class Recorder:
    def __init__(self, module, attr):
        self.kernel = getattr(module, attr)
        self.name = f"{module.__name__.rsplit('.', 1)[1]}:{attr}"
        setattr(module, attr, self)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            names = self.kernel.arg_names
            dns = not_specialized(self.kernel)
            key = [str(native_specialize_impl(BaseBackend, a, False, n not in dns, True)) for n, a in zip(names, args)]
            key += [f"{k}={v}" for k, v in sorted(kwargs.items())]
            keys.setdefault(self.name, {}).setdefault(LABEL, {}).setdefault(json.dumps(key), []).append(CASE)
            return self.kernel[grid](*args, **kwargs)
        return launch


for module, attr in [(roi_align, "_roi_align_kernel"), (suppression, "_suppression_kernel"),
                     (paste, "_paste_kernel"), (paste, "_position_kernel"), (rle, "_mark_kernel"),
                     (rle, "_compact_kernel"), (rle, "_run_kernel"), (rle, "_write_kernel"),
                     (channels_last, "_bias_add_kernel"), (channels_last, "_upsample_add_kernel"),
                     (channels_last, "_max_pool_kernel")] + [
        (fixed_rle, k) for k in ("_count_kernel", "_emit_kernel", "_mark_kernel", "_compact_kernel", "_run_kernel",
                                 "_write_kernel")]:
    Recorder(module, attr)

g = torch.Generator().manual_seed(0)
LABEL = ""  # what may select a variant besides the size (a constexpr rule, K): each label one key
# (image height, width) as padded for the network (multiples of 32), images, detections: level sizes of
# every divisibility by 16, a level 1 wide, 1 to 3 images, odd and even counts.
CASES = [(64, 96, 1, 3), (96, 160, 2, 4), (32, 32, 3, 1), (160, 224, 1, 6)]
for CASE in CASES:
    H, W, B, D = CASE
    LABEL = ""
    cl = torch.channels_last
    # The FPN's kernels: the stem's max pool (C = 64), a top-down merge and bias (C = 256).
    x = torch.randn(B, 64, H // 2, W // 2, generator=g).contiguous(memory_format=cl)
    channels_last.max_pool_3x3_s2(x)
    lat = torch.randn(B, 256, H // 8, W // 8, generator=g).contiguous(memory_format=cl)
    top = torch.randn(B, 256, H // 16, W // 16, generator=g).contiguous(memory_format=cl)
    bias = torch.randn(256, generator=g)
    channels_last.upsample_add(lat, top, bias)
    channels_last.bias_add_(lat, bias)
    # RoI Align from four channels-last levels (strides 4 to 32), 2 boxes per image and level.
    levels = [torch.randn(B, 32, H // s, W // s, generator=g).contiguous(memory_format=cl) for s in (4, 8, 16, 32)]
    lvl = torch.arange(4).repeat(2 * B)
    img = torch.arange(B).repeat_interleave(8)
    sizes = torch.tensor([[levels[i].shape[3], levels[i].shape[2]] * 2 for i in lvl.tolist()], dtype=torch.float32)
    boxes = torch.rand(8 * B, 4, generator=g) * sizes
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2])
    roi_align.roi_align_levels(levels, lvl, img, boxes, (7, 7), 2, channels_last=True)
    # NMS's suppression matrix on B groups of the RPN's 1000 candidates (a level's K is 1000 at every
    # served size, the detections' 1024: specialization.py keeps K specialized).
    xy = torch.rand(B, 1000, 2, generator=g) * W
    suppression.suppression_matrix(torch.cat([xy, xy + 8], 2), torch.ones(B, 1000, dtype=torch.bool), 0.5)
    # Paste and RLE of D detections in an image of the input's size, by both rules.
    for rule in ("torchvision", "detectron2"):
        LABEL = rule
        corner = torch.rand(D, 2, generator=g) * torch.tensor([W - 12.0, H - 12.0])
        dets = torch.cat([corner, corner + 4 + torch.rand(D, 2, generator=g) * 8], 1).numpy()
        probs = torch.rand(D, 28, 28, generator=g)
        inst, pos = masks.paste_transitions(probs, dets, H, W, 0.5, kernel=True, rule=rule)
        rle.strings(inst, pos, D, H, W, presorted=True)
        # The same inside a graph: B images' D slots each, capacities from the canvas as the engine's.
        n = B * D
        fixed_rle.encode(torch.rand(n, 28, 28, generator=g), torch.from_numpy(np.tile(dets, (B, 1))),
                         torch.ones(n, dtype=torch.bool), torch.full((n,), float(H)), torch.full((n,), float(W)),
                         0.5, B * int(0.75 * H * W), B * max(32 * H * W // 1024, 1), rule=rule, programs=4)

print(json.dumps(keys))
"""


def test_launches_at_every_size_share_one_specialization_key() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    keys = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(keys) == set(specialization.NOT_SPECIALIZED) | set(specialization.SPECIALIZED), sorted(keys)
    split = []
    for name, labelled in keys.items():
        for label, variants in labelled.items():  # the paste rule (a constexpr) may select a variant; sizes not
            if len(variants) != 1:
                split.append(f"{name} {label} compiles {len(variants)} variants for the cases (H, W, images, "
                             "detections): " + "; ".join(f"{sorted(set(map(tuple, cases)))}: {key}"
                                                         for key, cases in variants.items()))
    assert not split, "\n".join(split)
