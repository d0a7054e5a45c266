"""A worker's batches, overlapped: a batch is finished and encoded while the next one is on the device.

A batch costs the device's time (the network, the masks' paste and RLE) and the host's (one protobuf
response per image: for 100 instances with masks about half a millisecond each). One after the other,
a batch took their sum and the GPU sat idle while the host encoded. Here, in the one thread that
calls the engine:

    start batch k+1 (Engine.start queues its device work behind batch k's and returns) -> finish
    batch k (wait for its network, paste its masks) -> encode batch k's responses and hand them on
    -> start batch k+2 ...

so at saturation a batch costs the larger of the two, not their sum. Starting k+1 before finishing
k (rather than after) keeps the device's queue full while batch k's masks are pasted: the fast
engine pastes them on a stream of their own beside k+1's network. On an H200 (R50-FPN, 16 images
of 1280x720 with 100 instances each) that paste is 9 of the 35 ms an engine call takes alone.
The order is software pipelining, not a second thread: a thread that encodes beside the engine's
thread fought it for the GIL (every torch call releases and retakes it, and waited for the
encoder's switch interval each time); measured on an H200, the two-thread version served fewer
images than no overlap at all.

When no next batch is waiting (low load), the worker calls flush() and the batch is finished and
encoded at once: the overlap never delays an answer for a batch that is not there.
"""

from __future__ import annotations

import logging
from typing import Callable, Generic, TypeVar

from dd.worker.core import InferredBatch, Outcome, StartedBatch, WorkerCore, WorkItem

log = logging.getLogger("dd.worker")

T = TypeVar("T")


class BatchPipeline(Generic[T]):
    """push() starts a batch and answers the one before it; flush() answers the one in flight.
    on_done(outcomes, tag) gets each batch's outcomes in push order; on_failed(tag, exc) a batch that
    could not be answered (a bug or a broken socket: per-image errors are outcomes). between() runs
    after each batch is finished, with at most the next one started (e.g. unpinning the memory of a
    frontend that has gone: the engine waits for its device first, Engine.release_input_memory)."""

    def __init__(self, core: WorkerCore, on_done: Callable[[list[Outcome], T], None],
                 on_failed: Callable[[T, BaseException], None] | None = None,
                 between: Callable[[], None] | None = None) -> None:
        self.core = core
        self.on_done = on_done
        self.on_failed = on_failed or (lambda tag, exc: None)
        self.between = between or (lambda: None)
        self._inflight: tuple[StartedBatch, T] | None = None

    @property
    def busy(self) -> bool:
        """A batch has been started and not yet answered."""
        return self._inflight is not None

    def push(self, items: list[WorkItem], tag: T, started: float | None = None) -> None:
        """Starts this batch, then finishes, encodes and answers the one before it."""
        previous, self._inflight = self._inflight, None
        try:
            self._inflight = (self.core.start_batch(items, started), tag)
        finally:  # a failure to start still answers the batch before it
            if previous is not None:
                self._answer(*self._finish(*previous))

    def flush(self) -> None:
        """Finishes and answers the batch in flight, if any."""
        if self._inflight is not None:
            previous, self._inflight = self._inflight, None
            self._answer(*self._finish(*previous))

    def _finish(self, started: StartedBatch, tag: T) -> tuple[InferredBatch | BaseException, T]:
        try:
            inferred: InferredBatch | BaseException = self.core.finish_batch(started)
        except Exception as exc:  # noqa: BLE001 - finish_batch answers engine errors per item; this is a bug
            log.exception("worker %s: cannot finish a batch of %d", self.core.name, len(started.items))
            inferred = exc
        self.between()
        return inferred, tag

    def _answer(self, inferred: InferredBatch | BaseException, tag: T) -> None:
        if isinstance(inferred, BaseException):
            self.on_failed(tag, inferred)
            return
        try:
            outcomes = self.core.encode_batch(inferred)
            self.on_done(outcomes, tag)
        except Exception as exc:  # noqa: BLE001 - e.g. a socket error: those waiting must still hear
            log.exception("worker %s: cannot answer a batch of %d", self.core.name, len(inferred.items))
            self.on_failed(tag, exc)
