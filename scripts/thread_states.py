"""What a server's Python threads are doing under load, by repeated `py-spy dump --native`: holding the
GIL, waiting for it, running C code without it, or asleep (waiting for work, a lock or I/O).

Why: at saturation on the H200 (BENCHMARKS.md, S12) a request spent about 60 ms in a frontend's decode
that needs 15 ms of CPU, while that frontend's threads waited little for cores (schedstat) and a shorter
GIL switch interval changed nothing. A thread's CPU time cannot say what it sleeps on; a dump of every
thread's native stack can: a thread in `take_gil` waits for the GIL, one flagged `+gil` holds it.
Each dump stops the process for a few milliseconds, so dumps are spaced (`interval`).

    sampler = StateSampler({"frontend": [pid1, pid2], "worker": [pid3]}, interval=0.25)
    sampler.start(); ...load...; table = sampler.stop()  # {"frontend: decode": {"waits for the GIL": 2.5, ...}}

Needs py-spy on PATH (and ptrace rights over the server: the same user, or root).
"""

from __future__ import annotations

import re
import subprocess
import threading

from thread_stacks import available, thread_name  # noqa: F401 - callers ask this module for available()

STATES = ("holds the GIL", "waits for the GIL", "runs without the GIL", "sleeps")
_HEADER = re.compile(r'^Thread (\S+) \(([^)]*)\)(?:: "(.*)")?\s*$')


def parse_dump(text: str) -> list[tuple[str, str]]:
    """(thread name, state) for each thread of one `py-spy dump --native` output. The name loses a
    trailing number (a pool's threads add up) and "MainThread" reads "main thread", as in
    bench_requests.thread_times."""
    out: list[tuple[str, str]] = []
    name = flags = None
    frames: list[str] = []

    def flush() -> None:
        if name is None:
            return
        if "gil" in flags.split("+"):
            state = "holds the GIL"
        elif any(f.startswith("take_gil") for f in frames):
            state = "waits for the GIL"
        elif "active" in flags.split("+"):
            state = "runs without the GIL"
        else:
            state = "sleeps"
        out.append((name, state))

    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            flush()
            name = thread_name(m.group(3), m.group(1))
            flags = m.group(2)
            frames = []
        elif name is not None and line.startswith("    "):
            frames.append(line.strip())
    flush()
    return out


def dump(pid: int, timeout: float = 10.0) -> list[tuple[str, str]]:
    """One dump of a process's threads; [] when py-spy cannot read it (gone, no rights)."""
    try:
        done = subprocess.run(["py-spy", "dump", "--native", "--pid", str(pid)], capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_dump(done.stdout) if done.returncode == 0 else []


class StateSampler:
    """Dumps each process in `pids` (role -> pids) every `interval` seconds from a thread of its own
    until stop()."""

    def __init__(self, pids: dict[str, list[int]], interval: float = 0.25) -> None:
        self.pids = pids
        self.interval = interval
        self.counts: dict[tuple[str, str], dict[str, int]] = {}
        self.process_dumps: dict[str, int] = {}  # successful dumps per role
        self.dumps = 0  # rounds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="thread-states", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for role, pids in self.pids.items():
                for pid in pids:
                    threads = dump(pid)
                    if threads:
                        self.process_dumps[role] = self.process_dumps.get(role, 0) + 1
                    for name, state in threads:
                        per = self.counts.setdefault((role, name), dict.fromkeys(STATES, 0))
                        per[state] += 1
            self.dumps += 1
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, dict[str, float]]:
        """Per "role: thread name", how many of its threads were in each state in one process of that
        role, on average over the dumps (a pool's threads add up: 8 decode threads, 2.5 of them waiting
        for the GIL)."""
        self._stop.set()
        self._thread.join()
        return {f"{role}: {name}": {s: round(n / self.process_dumps[role], 2) for s, n in per.items()}
                for (role, name), per in sorted(self.counts.items())}
