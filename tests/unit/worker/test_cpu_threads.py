"""A worker's torch threads follow the cores it is pinned to, also when torch was imported before
the pinning (a worker forked from the zygote). Before the fix a CPU worker pinned to one of two cores
kept two OpenMP threads, which spun against each other: the demo model's request took 4.3 s of CPU
instead of 0.45 s."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

# torch imported first (its pool sized to every core, as in the zygote), then pinned to one core.
CHILD = """
import os, sys
import torch
before = torch.get_num_threads()
from dd.worker.server import pin_process
pin_process(None, [sorted(os.sched_getaffinity(0))[0]], int(sys.argv[1]))
print(before, torch.get_num_threads(), os.environ["OMP_NUM_THREADS"])
"""


def _child(configured: int, env: dict[str, str] | None = None) -> tuple[int, int, str]:
    full = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    full.update(env or {}, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", CHILD, str(configured)], capture_output=True, text=True,
                         env=full, timeout=120, check=True).stdout.split()
    return int(out[0]), int(out[1]), out[2]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to pin to fewer than torch saw")
def test_pinned_to_one_core_torch_uses_one_thread() -> None:
    before, after, env = _child(0)
    if before < 2:
        pytest.skip("torch chose one thread before the pinning (one physical core): nothing to show")
    assert (after, env) == (1, "1")


def test_torch_threads_given_win() -> None:
    assert _child(3)[1:] == (3, "3")


def test_the_environment_wins_over_the_cores() -> None:
    assert _child(0, {"OMP_NUM_THREADS": "2"})[1:] == (2, "2")
