"""scripts/soak.py's memory verdict: a process whose RSS swings with the messages in flight and gives
the memory back is not growing; one whose floor rises is; a worker restarted during the run is not
judged from its first sample, taken as it started. The series below are from the CPU box (MiB at each
10 s sample): a frontend of a 120 s `soak.py --hostile` run, which the earlier check (peak against the
first sample: 71 MiB over its 64 MiB limit) called growth, and the last worker of a 4-minute
`soak.py --model configs/models/demo-rgbd --kill-every 60` run, which both checks called growth."""

from __future__ import annotations

import importlib.util
from pathlib import Path

MIB = 2**20
SPEC = importlib.util.spec_from_file_location("soak", Path(__file__).resolve().parents[2] / "scripts" / "soak.py")
soak = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(soak)

HOSTILE_FRONTEND = [194, 214, 214, 245, 248, 252, 224, 246, 246, 265, 194, 215, 215]


def test_a_swing_that_is_given_back_is_not_growth() -> None:
    rss = [v * MIB for v in HOSTILE_FRONTEND]
    assert max(rss) - rss[0] > soak.RSS_GROWTH_LIMIT  # what the peak check failed on
    assert soak.rss_growth(rss) <= soak.RSS_GROWTH_LIMIT


def test_a_rising_floor_is_growth() -> None:
    leak = [(194 + 8 * i) * MIB for i in range(13)]  # 8 MiB more at every sample
    assert soak.rss_growth(leak) > soak.RSS_GROWTH_LIMIT
    swinging_leak = [v + 8 * i * MIB for i, v in enumerate(v * MIB for v in HOSTILE_FRONTEND)]
    assert soak.rss_growth(swinging_leak) > soak.RSS_GROWTH_LIMIT


def test_few_samples() -> None:
    assert soak.rss_growth([]) == 0
    assert soak.rss_growth([100 * MIB]) == 0
    assert soak.rss_growth([100 * MIB, 300 * MIB]) == 200 * MIB  # the last sample is the floor of one


def series(name: str, mib: list[int], fds: int = 30) -> list[tuple[str, int, int]]:
    return [(name, v * MIB, fds) for v in mib]


def test_only_processes_alive_at_the_first_sample_are_judged() -> None:
    samples = {1: series("frontend", HOSTILE_FRONTEND), 2: series("worker", [655, 1025, 964, 936])}
    assert soak.growth_problems(samples, lived_through={1}) == []
    assert soak.growth_problems(samples, lived_through={1, 2}) != []  # what the soak judged before


def test_growth_problems_names_memory_and_files() -> None:
    samples = {7: series("worker", [200 + 10 * i for i in range(12)]),
               8: [("frontend", 80 * MIB, 30)] * 5 + [("frontend", 80 * MIB, 60)]}
    problems = soak.growth_problems(samples, lived_through={7, 8})
    assert len(problems) == 2
    assert problems[0].startswith("worker (pid 7) RSS grew 200 -> 290 MiB")
    assert problems[1] == "frontend (pid 8) open files grew 30 -> 60"
