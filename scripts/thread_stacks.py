"""Where a server process's threads spend their time, from `py-spy record --native --idle --threads`:
for each thread name, the places its samples were in (our code's innermost frame, the innermost Python
frame, the C function it called, the native leaf), most frequent first, and the share of samples that
wait for the GIL.

Why: at saturation on the H200 (BENCHMARKS.md, S13-1) a frontend's decode took 59 ms for 15 ms of CPU,
and py-spy dumps (scripts/thread_states.py) said the decode threads mostly sleep, not on what. A few
dumps cannot say; a few hundred samples of each thread's stack, idle ones included, can: a thread at
`result (_base.py)` in decode_into_slot waits for its depth, one in `pthread_cond_timedwait` right
under a Python or extension frame waits for the GIL (CPython's only timed condition wait; its locks
use semaphores), one in `imdecode` decodes.

    rec = Recording(pid, seconds=3, rate=50); ...load...; where = rec.result()
    # {"decode": {"samples": 450, "gil_wait": 0.12, "where": [("decode_into_slot (decode.py:478) > ...", 0.3), ...]}}

Each sample stops the process for a moment (native stacks need it), so record one process of a role,
at a modest rate. Needs py-spy on PATH and ptrace rights over the process.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

_PY_FRAME = re.compile(r"^(?P<func>.+) \((?P<file>[^()]+\.py):(?P<line>\d+)\)$")
_NATIVE = re.compile(r"^(?P<func>[^ ]+) \((?P<lib>[^()]+)\)$")
_THREAD = re.compile(r"^thread \((?P<tid>[^)]*)\)(?:: (?P<name>.*))?$")
# Functions a thread waiting for the GIL sits in (take_gil and PyEval_RestoreThread where the binary has
# their symbols; otherwise the condition wait they call, which CPython uses for nothing else).
GIL_WAIT = ("take_gil", "PyEval_RestoreThread", "PyEval_AcquireThread", "PyGILState_Ensure",
            "pthread_cond_timedwait")
OUR_CODE = ("/dd/", "/scripts/")
TOP = 6  # places reported per thread name


def available() -> bool:
    return shutil.which("py-spy") is not None


def thread_name(raw: str | None, tid: str) -> str:
    """A pool's threads add up: a trailing number goes ("decode_3" -> "decode"); "MainThread" reads
    "main thread", as in bench_requests.thread_times."""
    if raw is None:
        return tid
    raw = raw.split(" (")[0]  # threading adds "(target)" to default names
    return "main thread" if raw == "MainThread" else re.sub(r"[_/-]?\d+$", "", raw) or raw


def place(frames: list[str]) -> tuple[str, bool]:
    """A sample's place, in words, and whether it waits for the GIL. `frames` root first."""
    names = [f for f in frames if not f.startswith("0x")]
    last_py = max((i for i, f in enumerate(names) if _PY_FRAME.match(f)), default=-1)
    ours = next((f for f in reversed(names[:last_py + 1])
                 if (m := _PY_FRAME.match(f)) and _ours(m["file"])), None)
    parts = []
    if ours is not None:
        parts.append(_short(ours))
    if last_py >= 0 and names[last_py] != ours:
        parts.append(_short(names[last_py]))
    below = names[last_py + 1:]
    if below:
        parts.append(_native(below[0]))
        if len(below) > 1:
            parts.append(_native(below[-1]))
    leaf = names[-1] if names else ""
    gil = any(_native(f) in GIL_WAIT[:4] for f in below) or _native(leaf) == "pthread_cond_timedwait"
    return " > ".join(parts) or "(no frames)", gil


def _ours(path: str) -> bool:
    return any(p in path for p in OUR_CODE) or path.startswith(("dd/", "scripts/"))


def _short(frame: str) -> str:
    m = _PY_FRAME.match(frame)
    return f"{m['func']} ({Path(m['file']).name}:{m['line']})" if m else frame


def _native(frame: str) -> str:
    m = _NATIVE.match(frame)
    return m["func"] if m else frame


def summarize(raw: str, top: int = TOP) -> dict[str, dict]:
    """py-spy's raw (folded) output, `thread (TID): NAME;frame;...;frame COUNT` per line, by thread name:
    samples (all threads of that name together), the share waiting for the GIL, and the `top` places."""
    places: dict[str, Counter] = defaultdict(Counter)
    gil: Counter = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        m = _THREAD.match(frames[0])
        if m is None:
            continue
        name = thread_name(m["name"], m["tid"])
        where, waits = place(frames[1:])
        places[name][where] += int(count)
        if waits:
            gil[name] += int(count)
    out = {}
    for name, counter in sorted(places.items()):
        n = sum(counter.values())
        out[name] = {"samples": n, "gil_wait": round(gil[name] / n, 3),
                     "where": [(w, round(c / n, 3)) for w, c in counter.most_common(top)]}
    return out


class Recording:
    """`py-spy record` of one process for `seconds`, starting `delay` seconds from now (past a load's
    connection and warm-up); result() waits for it and summarizes ({} when py-spy could not read the
    process: gone, or no ptrace rights)."""

    def __init__(self, pid: int, seconds: float, rate: int = 50, delay: float = 0.0) -> None:
        self._dir = tempfile.mkdtemp(prefix="thread-stacks-")
        self.path = Path(self._dir) / "raw.txt"
        self._cmd = ["py-spy", "record", "--native", "--idle", "--threads", "--format", "raw", "--rate", str(rate),
                     "--duration", str(max(1, round(seconds))), "--output", str(self.path), "--pid", str(pid)]
        self._thread = threading.Thread(target=self._run, args=(delay, seconds), name="thread-stacks", daemon=True)
        self._thread.start()

    def _run(self, delay: float, seconds: float) -> None:
        time.sleep(delay)
        try:
            subprocess.run(self._cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=seconds + 60)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def result(self) -> dict[str, dict]:
        self._thread.join()
        try:
            return summarize(self.path.read_text()) if self.path.exists() else {}
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
