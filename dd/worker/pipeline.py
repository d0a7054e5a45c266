"""A worker's batches, overlapped: this batch's responses are encoded while the next one is on the device.

A batch costs the device's time (the network, the masks' paste and RLE) and the host's (one protobuf
response per image: for 100 instances with masks about half a millisecond each). One after the other,
a batch took their sum and the GPU sat idle while the host encoded. Here, in the one thread that
calls the engine:

    finish batch k (wait for the device, read its answers) -> start batch k+1 (Engine.start queues
    its device work and returns) -> encode batch k's responses and hand them on -> finish k+1 ...

so at saturation a batch costs the larger of the two, not their sum. The order is software
pipelining, not a second thread: a thread that encodes beside the engine's thread fought it for
the GIL (every torch call releases and retakes it, and waited for the encoder's switch interval
each time); measured on an H200, the two-thread version served fewer images than no overlap at all.

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
    while no batch is on the device (e.g. unpinning the memory of a frontend that has gone)."""

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
        """Finishes the batch in flight, starts this one, then encodes and answers the finished one."""
        finished = self._finish()
        try:
            self._inflight = (self.core.start_batch(items, started), tag)
        finally:  # a failure to start still answers the batch before it
            if finished is not None:
                self._answer(*finished)

    def flush(self) -> None:
        """Finishes and answers the batch in flight, if any."""
        finished = self._finish()
        if finished is not None:
            self._answer(*finished)

    def _finish(self) -> tuple[InferredBatch | BaseException, T] | None:
        if self._inflight is None:
            return None
        started, tag = self._inflight
        self._inflight = None
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
