"""Calls for the zygote to run beside its imports (tests/unit/test_zygote.py), cached in the process the
way Triton caches its key of itself."""

import functools
import os
import threading
import time
from pathlib import Path


@functools.lru_cache()
def key() -> str:
    """The thread that computed it. With DD_TEST_BESIDE_GATE set, waits for that file first, so that a test
    can hold the call open while the zygote's imports finish."""
    gate = os.environ.get("DD_TEST_BESIDE_GATE")
    if gate:
        Path(gate + ".waiting").touch()
        while not Path(gate).exists():
            time.sleep(0.01)
    return threading.current_thread().name


def boom() -> None:
    raise RuntimeError("a call that fails beside the imports")
