"""A module whose import waits for a file, for the zygote's tests: it stands for torch's import (the
longest step of a start) held open as long as the test wants. The file is $DD_TEST_ZYGOTE_GATE; the
import writes that name + ".importing" when it starts to wait."""

from __future__ import annotations

import os
import time
from pathlib import Path

_gate = Path(os.environ["DD_TEST_ZYGOTE_GATE"])
_gate.with_name(_gate.name + ".importing").touch()
while not _gate.exists():
    time.sleep(0.01)
