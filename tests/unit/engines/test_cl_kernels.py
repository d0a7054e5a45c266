"""The channels-last Triton kernels (dd/worker/engines/kernels/channels_last.py), run in Triton's interpreter on
the CPU (CI has no GPU): bias_add_, upsample_add and max_pool_3x3_s2 give their torch references'
values bit for bit (NaN where a NaN is, the same bits everywhere else, -0.0 included), and the
references give the plain PyTorch operations' values. Argument checks and the fallback for tensors
that are not channels-last run in this process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from dd.worker.engines.kernels import channels_last as cl_kernels  # noqa: E402

REPO = Path(__file__).resolve().parents[3]

SCRIPT = r"""
import torch
import torch.nn.functional as F

from dd.worker.engines.kernels import channels_last as K

CL = torch.channels_last
g = torch.Generator().manual_seed(0)
BITS = {torch.float16: torch.int16, torch.float32: torch.int32}


def same(got, want, what):
    # bit for bit, NaNs compared by position only (PyTorch's CPU code may quiet a NaN's payload)
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape, want.shape)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), what
    bits = BITS[want.dtype]
    assert torch.equal(got.masked_fill(nan, 0).view(bits), want.masked_fill(nan, 0).view(bits)), what


def data(shape, dt):
    x = torch.randn(shape, generator=g) * 8
    x.view(-1)[::97] = 60000.0  # fp16 sums overflow to inf here
    x.view(-1)[5::89] = -60000.0
    x.view(-1)[7::53] = -0.0
    return x.to(dt).contiguous(memory_format=CL)


# (N, C, H, W) of the lateral, (h, w) of the top. 46x44 from 14x26: PyTorch's float32 rule picks a
# different source row/column than floor(dst * in / out) at dst 23 and 22. 5x7 from 13x19: down.
# C=256 with W=38: several pixel blocks a row; C=300 / 512: several channel blocks, uneven / even.
CASES = [(2, 16, 13, 21, 7, 11), (2, 24, 25, 38, 13, 19), (2, 16, 48, 84, 24, 42), (1, 8, 46, 44, 14, 26),
         (1, 8, 5, 7, 13, 19), (1, 256, 3, 38, 2, 19), (1, 300, 3, 5, 2, 3), (1, 512, 2, 3, 1, 2)]

# PyTorch's nearest index rule is float32 arithmetic, not exact division: show it on 14 -> 46
rows = F.interpolate(torch.arange(14.0).view(1, 1, 14, 1), size=(46, 1), mode="nearest").flatten().long()
scale = torch.tensor(14.0) / torch.tensor(46.0)
rule = torch.clamp((torch.arange(46.0) * scale).floor().long(), max=13)
assert torch.equal(rows, rule) and rows[23] == 6 and (23 * 14) // 46 == 7

rounding_seen = False
for dt in (torch.float16, torch.float32):
    for n, c, hh, ww, h, w in CASES:
        what = (dt, n, c, hh, ww, h, w)
        lat = data((n, c, hh, ww), dt)
        top = data((n, c, h, w), dt)
        bias = (torch.randn(c, generator=g) * 4).to(dt)
        assert K.use_kernel(lat, top)
        up = F.interpolate(top, size=(hh, ww), mode="nearest")

        # bias_add_: kernel == reference == PyTorch's add; in place
        ref = K.bias_add_reference_(lat.clone(), bias)
        same(ref, lat + bias.view(1, -1, 1, 1), what)
        x = lat.clone()
        assert K.bias_add_(x, bias) is x
        same(x, ref, what)
        same(K.bias_add_(lat.clone(), bias.double()), K.bias_add_reference_(lat.clone(), bias.double()), what)

        # upsample_add: kernel == reference == PyTorch's two adds, with and without bias, into out
        for b in (None, bias):
            ref = K.upsample_add_reference(lat, top, b)
            plain = (lat if b is None else lat + b.view(1, -1, 1, 1)) + up
            same(ref, plain, what)
            got = K.upsample_add(lat, top, b)
            assert got.is_contiguous(memory_format=CL)
            same(got, ref, what)
            out = torch.empty_like(lat)
            assert K.upsample_add(lat, top, b, out=out) is out
            same(out, ref, what)
            inplace = lat.clone()
            K.upsample_add(inplace, top, b, out=inplace)
            same(inplace, ref, what)
        if dt == torch.float16:  # one rounding instead of two would show
            once = (lat.float() + bias.float().view(1, -1, 1, 1) + up.float()).to(dt)
            rounding_seen |= not torch.equal(once.nan_to_num(), K.upsample_add(lat, top, bias).nan_to_num())

        # max_pool_3x3_s2: NaNs, -inf, -0.0 and edges
        x = lat.clone()
        x[:, :, 0, 0] = float("nan")
        x[0, :, hh // 2, ww - 1] = float("nan")
        x[:, 1, hh // 2:, 1:] = float("-inf")  # whole windows of -inf at the bottom right
        ref = K.max_pool_3x3_s2_reference(x)
        same(ref, F.max_pool2d(x, 3, 2, 1), what)
        windows = F.pad(x.float(), (1, 1, 1, 1), value=float("-inf")).unfold(2, 3, 2).unfold(3, 3, 2)
        same(ref, windows.amax((-1, -2)).to(dt), what)  # amax propagates NaN too
        assert torch.isnan(ref[:, :, 0, 0]).all()
        got = K.max_pool_3x3_s2(x)
        assert got.is_contiguous(memory_format=CL)
        same(got, ref, what)
assert rounding_seen

# tiny and degenerate shapes; max pool with every number of output rows a program
for shape in [(1, 3, 1, 1), (2, 5, 2, 2), (1, 1, 3, 4), (1, 16, 1, 7), (1, 8, 9, 6)]:
    x = data(shape, torch.float16)
    x[:, :, ::3, 1::2] = float("nan")
    for rows in (1, 2, 3):
        K.POOL_ROWS = rows
        same(K.max_pool_3x3_s2(x), F.max_pool2d(x, 3, 2, 1), (shape, rows))
    same(K.upsample_add(x, x[:, :, :1, :1].contiguous(memory_format=CL)),
         x + F.interpolate(x[:, :, :1, :1], size=shape[2:], mode="nearest"), shape)
print("ok")
"""


def test_kernels_match_torch_in_triton_interpreter() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def _cl(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return torch.randn(*shape).to(dtype).contiguous(memory_format=torch.channels_last)


def test_not_channels_last_falls_back_to_reference() -> None:
    x = torch.randn(2, 8, 9, 10).half()  # NCHW contiguous
    top = torch.randn(2, 8, 5, 5).half()
    bias = torch.randn(8).half()
    assert not cl_kernels.use_kernel(x)
    y = x.clone()
    assert cl_kernels.bias_add_(y, bias) is y
    assert torch.equal(y, x + bias.view(1, -1, 1, 1))
    got = cl_kernels.upsample_add(x, top, bias)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, x + bias.view(1, -1, 1, 1) + torch.nn.functional.interpolate(top, size=(9, 10)))
    out = torch.empty_like(x)
    assert cl_kernels.upsample_add(x, top, out=out) is out
    pooled = cl_kernels.max_pool_3x3_s2(x)
    assert pooled.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(pooled, torch.nn.functional.max_pool2d(x, 3, 2, 1))


@pytest.mark.parametrize("call, message", [
    (lambda: cl_kernels.bias_add_(_cl(2, 8, 3, 3)[0], torch.zeros(8)), "4-D"),
    (lambda: cl_kernels.bias_add_(_cl(2, 8, 3, 3, dtype=torch.float64), torch.zeros(8)), "float16"),
    (lambda: cl_kernels.bias_add_(_cl(2, 8, 3, 3), torch.zeros(7)), "C=8"),
    (lambda: cl_kernels.bias_add_(_cl(2, 8, 3, 3), torch.zeros(8, dtype=torch.int32)), "floating"),
    (lambda: cl_kernels.upsample_add(_cl(2, 8, 6, 6), _cl(2, 8, 3, 3, dtype=torch.float32)), "dtype"),
    (lambda: cl_kernels.upsample_add(_cl(2, 8, 6, 6), _cl(2, 4, 3, 3)), "C=8"),
    (lambda: cl_kernels.upsample_add(_cl(2, 8, 6, 6), _cl(2, 8, 3, 3), out=_cl(2, 8, 6, 5)), "out must"),
    (lambda: cl_kernels.max_pool_3x3_s2(_cl(2, 8, 3, 3, dtype=torch.float64)), "float16"),
])
def test_bad_arguments_raise_value_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
