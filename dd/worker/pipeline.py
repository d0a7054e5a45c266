"""Two stages per worker: the next batch's engine call overlaps this batch's response encoding.

A batch costs the GPU's time (the network, the masks' paste and RLE) and then the host's (one
protobuf response per image: for 100 instances with masks about 0.5-1 ms each in Python). Run one
after the other in one thread, a batch of 8 took the sum, and the GPU sat idle while the host
encoded. Here the thread that calls the engine hands each inferred batch to an encoding thread and
goes on with the next batch; while it waits for the GPU it holds no GIL, so the encoding runs then.
At saturation a batch costs the larger of the two instead of their sum. At concurrency 1 nothing
overlaps and the hand-over costs one thread wake-up.

The queue between the stages holds at most `depth` batches, so a slow encoder holds the engine
back (and with it the batcher, and the frontends' credits) rather than piling up answers.

The encoding thread must not die silently: every batch it takes ends in `on_done` (the outcomes)
or `on_failed` (the exception), and `alive` says whether it still runs, so the worker can exit for
a restart (as it does when its inference thread dies).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable, Generic, TypeVar

from dd.worker.core import InferredBatch, Outcome, WorkerCore, WorkItem

log = logging.getLogger("dd.worker")

T = TypeVar("T")
_STOP = object()


class BatchPipeline(Generic[T]):
    """submit() runs a batch's engine half on the caller's thread and queues its encoding;
    on_done(outcomes, tag) / on_failed(tag, exc) are called on the encoding thread, in submission order."""

    def __init__(self, core: WorkerCore, on_done: Callable[[list[Outcome], T], None],
                 on_failed: Callable[[T, BaseException], None] | None = None, depth: int = 1,
                 name: str = "") -> None:
        self.core = core
        self.on_done = on_done
        self.on_failed = on_failed or (lambda tag, exc: None)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._thread = threading.Thread(target=self._encode_loop, name=f"encode-{name}" if name else "encode",
                                        daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, items: list[WorkItem], tag: T, started: float | None = None) -> None:
        """The engine half now, the encoding on the other thread. Blocks while `depth` batches wait
        for encoding. An error in the engine half is raised here (the caller answers for the batch)."""
        inferred = self.core.infer_batch(items, started)
        self._queue.put((inferred, tag))

    def drain(self) -> None:
        """Returns once every batch submitted so far has been encoded and handed to on_done/on_failed."""
        self._queue.join()

    def close(self) -> None:
        """Encodes what is queued, then stops the encoding thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    def __enter__(self) -> "BatchPipeline[T]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _encode_loop(self) -> None:
        while True:
            entry = self._queue.get()
            try:
                if entry is _STOP:
                    return
                inferred, tag = entry
                self._finish(inferred, tag)
            finally:
                self._queue.task_done()

    def _finish(self, inferred: InferredBatch, tag: T) -> None:
        try:
            outcomes = self.core.encode_batch(inferred)
        except Exception as exc:  # noqa: BLE001 - encode_batch answers per item; this is a bug, not an input
            log.exception("worker %s: cannot encode a batch of %d", self.core.name, len(inferred.items))
            self.on_failed(tag, exc)
            return
        try:
            self.on_done(outcomes, tag)
        except Exception as exc:  # noqa: BLE001 - e.g. a socket error: those waiting must still hear
            log.exception("worker %s: cannot send the answers to a batch of %d", self.core.name,
                          len(inferred.items))
            self.on_failed(tag, exc)
