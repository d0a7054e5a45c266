"""scripts/soak.py's memory verdict: a process whose RSS swings with the messages in flight and gives
the memory back is not growing; one whose floor rises is. The swing below is the frontend of a 120 s
`soak.py --hostile` run on the CPU box (MiB at each 10 s sample), which the earlier check (peak
against the first sample: 71 MiB over its 64 MiB limit) called growth."""

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
