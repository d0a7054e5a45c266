"""CUDA graphs by shape, captured without making requests wait.

The fast engine captures a graph per (batch bucket, canvas) (canvases.py). The shapes
named at load are captured then, others (the largest canvases, by default) right after
load by the background thread here; a request at a shape without a graph used to wait
while its graph was captured in service (seconds with cuDNN's autotuning; measured on
an H200: 1.0-2.9 s for a 640x480 image against a 4 ms replay). Here such a shape is
served at once on the same network run op by op (about 3x a replay, no stall), while
one background thread captures its graph; later requests replay it. A capture that
fails leaves that shape on the op-by-op path for good, with one warning.

The fast engine keeps its input graphs here too (input_graphs.py: the preparation of a
batch of one input size and depth kind, keyed by bucket, canvas, size and depth kind),
captured the same way: a batch whose input graph is on its way is prepared op by op.

The cache is generic (keys and a capture function), so that its threading is tested
on the CPU without CUDA; the engine supplies a capture function that warms up and records
on a stream of its own, so the serving thread keeps launching work while a capture warms
up, and waits (`recording`) only while a graph records: the network's in CUDA's global
capture mode, in which another thread's device-wide calls would break the capture.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Entry = TypeVar("Entry")


class GraphCache(Generic[Entry]):
    """Captured entries by key; a missing key is captured in the background (or at once)."""

    def __init__(self, capture: Callable[[Hashable], Entry], background: bool = True,
                 describe: Callable[[Hashable], str] = str) -> None:
        """describe(key) names what a key's capture makes, for the logs ("the network for ...")."""
        self._capture = capture
        self.background = background
        self._describe = describe
        self._ready: dict[Hashable, Entry] = {}
        self._queued: list[Hashable] = []
        self._failed: set[Hashable] = set()
        self._lock = threading.Lock()
        # Held by the engine's thread while it runs a batch and by a capture while it records (not
        # while it warms up): the serving thread then never makes a call that CUDA forbids during a
        # capture (a device-wide synchronisation), and waits at most one recording (tens of ms).
        self.recording = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.captured_in_background = 0  # for logs, benchmarks and tests

    def capture_now(self, key: Hashable) -> Entry:
        """Captures `key` in the calling thread (at load: nothing is being served yet)."""
        entry = self._ready.get(key)
        if entry is None:
            entry = self._capture(key)
            with self._lock:
                self._ready[key] = entry
        return entry

    def ready(self, key: Hashable) -> Entry | None:
        """The entry for `key` if it has been captured, else None (nothing is queued)."""
        return self._ready.get(key)

    def get(self, key: Hashable) -> Entry | None:
        """The entry for `key`, or None: serve this call without a graph (its capture is on its way)."""
        entry = self._ready.get(key)
        if entry is not None:
            return entry
        if not self.background:
            return self.capture_now(key)
        with self._lock:
            if key in self._failed or key in self._queued or self._closed:
                return None
            self._queued.append(key)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="graph-capture", daemon=True)
                self._thread.start()
                # A daemon thread still inside CUDA when the interpreter finalises aborts the process
                # ("terminate called without an active exception"): at exit, let its capture end first.
                ref = weakref.ref(self)
                atexit.register(lambda: (cache := ref()) is not None and cache.close())
            self._wake.notify()
        return None

    def pending(self) -> int:
        with self._lock:
            return len(self._queued)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Until no capture is queued or running (tests, benchmarks); False on timeout."""
        until = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._queued:
                left = None if until is None else until - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._wake.wait(left)
        return True

    def close(self, timeout: float | None = 120.0) -> bool:
        """No capture starts after this; waits (up to `timeout` s) for one under way to end, so that no
        thread records into a pool or a context being torn down (another engine loading in the same
        process, or the interpreter exiting). False if the capture was still running at the timeout."""
        with self._lock:
            self._closed = True
            self._queued.clear()
            self._wake.notify_all()
            thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        if thread.is_alive():
            log.warning("a background graph capture was still running %s s after close", timeout)
            return False
        return True

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queued and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                key = self._queued[0]
            t0 = time.perf_counter()
            try:
                entry = self._capture(key)
            except Exception as exc:  # noqa: BLE001 - that shape stays on the op-by-op path; serving goes on
                log.warning("cannot capture %s in the background (%s: %s); requests of that shape keep "
                            "running op by op", self._describe(key), type(exc).__name__, exc)
                with self._lock:
                    self._failed.add(key)
                    self._discard(key)
                    self._wake.notify_all()
                continue
            with self._lock:
                self._ready[key] = entry
                self._discard(key)
                self.captured_in_background += 1
                self._wake.notify_all()
            log.info("captured %s in the background in %.1f s; its requests were served op by op meanwhile",
                     self._describe(key), time.perf_counter() - t0)

    def _discard(self, key: Hashable) -> None:
        if key in self._queued:  # close() may have emptied the queue meanwhile
            self._queued.remove(key)
