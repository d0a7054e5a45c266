"""The worker's CUDA context created ahead, through the driver, while it builds its model (issue #18, start-up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

# A fresh process each: CUDA may be initialised in the test process already.
PROBE = """
import ctypes, json, logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(message)s")
from dd.worker.cuda_context import create_ahead
create_ahead(0).join()
state = None
try:
    lib = ctypes.CDLL("libcuda.so.1")
    dev, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
    if lib.cuDeviceGet(ctypes.byref(dev), 0) == 0 and lib.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(active)) == 0:
        state = active.value
except OSError:
    pass
import torch
out = {"active_before_torch": state, "torch_cuda": torch.cuda.is_available()}
if out["torch_cuda"]:
    out["sum"] = float(torch.ones(3, device="cuda").sum())
print(json.dumps(out))
"""


def probe(env: dict[str, str]) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                          env=dict(env, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_without_a_usable_gpu_the_thread_ends_and_torch_goes_on_without_cuda() -> None:
    got, log = probe(dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert got["active_before_torch"] in (None, 0) and not got["torch_cuda"]
    assert "CUDA context not created ahead" in log


@pytest.mark.gpu
def test_the_primary_context_is_there_before_torch_and_torch_uses_it() -> None:
    got, log = probe(dict(os.environ))
    assert got == {"active_before_torch": 1, "torch_cuda": True, "sum": 3.0}, log
    assert "created ahead" in log
