"""What the frontend's request path hands the metrics recorder: the ring gauge as slots come and go
(dd.frontend.slots), a failure's status by what it failed with (dd.frontend.dispatcher). The recorder
here only writes down its calls; that those reach the endpoint is tests/test_metrics*.py's part."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from dd.frontend.dispatcher import Dispatcher
from dd.frontend.errors import ServeError, Status
from dd.frontend.slots import SlotPool
from dd.ipc.shm_ring import SHM_DIR, ShmRing, segment_name

TAG = "5107510753"  # a run tag no real run has


class Calls:
    """A Recorder's interface that writes down what it is told."""

    enabled = True

    def __init__(self) -> None:
        self.ring: list[tuple[int, int | None]] = []
        self.requests: list[tuple[str, bool, str]] = []

    def set_ring_slots(self, in_use: int, capacity: int | None = None) -> None:
        self.ring.append((in_use, capacity))

    def record_request(self, model: str, ok: bool, duration_us: float, *args: float, status: str = "OK") -> None:
        self.requests.append((model, ok, status))


@pytest.fixture
def ring():
    name = segment_name(TAG, "fe")
    (SHM_DIR / name).unlink(missing_ok=True)
    r = ShmRing.create(name, slots=2, slot_bytes=4096)
    yield r
    r.close()
    r.unlink()


def test_the_ring_gauge_follows_slots_taken_handed_on_and_given_back(ring: ShmRing) -> None:
    calls = Calls()

    async def go() -> None:
        pool = SlotPool(ring, calls)
        assert calls.ring == [(0, 2)]  # capacity once, at start
        a = await pool.acquire(time.time() + 60)
        b = await pool.acquire(time.time() + 60)
        assert calls.ring[-1] == (2, None)
        waiter = asyncio.create_task(pool.acquire(time.time() + 60))
        await asyncio.sleep(0)
        pool.release(a[0])  # straight to the waiter: still 2 in use
        assert (await waiter) is not None and calls.ring[-1] == (2, None)
        pool.release(b[0])
        assert calls.ring[-1] == (1, None)

    asyncio.run(go())
    assert all(0 <= n <= 2 for n, _ in calls.ring)


@pytest.mark.parametrize("exc, status", [
    (ServeError(Status.RESOURCE_EXHAUSTED, "busy"), "RESOURCE_EXHAUSTED"),
    (ServeError(Status.INVALID_ARGUMENT, "bad image"), "INVALID_ARGUMENT"),
    (asyncio.CancelledError(), "CANCELLED"),
    (RuntimeError("a bug"), "INTERNAL"),
])
def test_a_failure_is_counted_by_the_status_it_failed_with(tmp_path: Path, exc: BaseException, status: str) -> None:
    calls = Calls()
    dispatcher = Dispatcher(tmp_path, lambda model: 1, recorder=calls)  # type: ignore[arg-type]
    try:
        dispatcher.record_failure("m", exc)
    finally:
        dispatcher.ctx.term()
    assert calls.requests == [("m", False, status)]
