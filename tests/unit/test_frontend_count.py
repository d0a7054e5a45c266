"""The default frontend count (ServerConfig.resolved_frontends): half the cores, less one per worker beyond
the first, 1 to 32. On the H200 host (16 cores, one worker) 8 frontends served more than 12 and far more
than 16, which took CPU from the worker feeding the GPU (BENCHMARKS.md, session 9); the old default there
was 14."""

from __future__ import annotations

import os

import pytest

from dd.config import ServerConfig


@pytest.mark.parametrize("cores,workers,want", [(16, 1, 8), (2, 1, 1), (4, 1, 2), (8, 1, 4), (32, 4, 13),
                                                (128, 8, 32), (1, 1, 1), (16, 0, 8)])
def test_half_the_cores_less_one_per_extra_worker(monkeypatch: pytest.MonkeyPatch, cores: int, workers: int,
                                                  want: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cores)), raising=False)
    assert ServerConfig().resolved_frontends(workers) == want


def test_a_count_given_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(64)), raising=False)
    assert ServerConfig(frontends=3).resolved_frontends(8) == 3
