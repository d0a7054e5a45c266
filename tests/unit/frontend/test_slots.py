"""dd.frontend.slots: ring slots handed out, waited for up to a deadline, and shared fairly between owners."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import pytest

from dd.frontend.slots import SlotPool
from dd.ipc.shm_ring import SHM_DIR, ShmRing, segment_name

TAG = "5107510751"  # a run tag no real run has


@pytest.fixture
def ring():
    name = segment_name(TAG, "fe")
    (SHM_DIR / name).unlink(missing_ok=True)
    r = ShmRing.create(name, slots=2, slot_bytes=4096)
    yield r
    r.close()
    r.unlink()


def test_slots_are_handed_out_until_none_is_free_then_given_up_at_the_deadline(ring: ShmRing) -> None:
    async def go() -> None:
        pool = SlotPool(ring)
        a = await pool.acquire(time.time() + 60)
        b = await pool.acquire(time.time() + 60)
        assert a is not None and b is not None and a[0] != b[0]
        assert await pool.acquire(time.time() - 1) is None  # full, and the deadline has passed
        pool.release(a[0])
        again = await pool.acquire(time.time() + 60)
        assert again is not None and again[0] == a[0] and again[1] != a[1]  # a new generation

    asyncio.run(go())


def test_a_released_slot_goes_to_a_waiter(ring: ShmRing) -> None:
    async def go() -> None:
        pool = SlotPool(ring)
        a = await pool.acquire(time.time() + 60)
        await pool.acquire(time.time() + 60)
        waiter = asyncio.ensure_future(pool.acquire(time.time() + 600))
        await asyncio.sleep(0)  # it is waiting now: no slot is free
        assert not waiter.done()
        pool.release(a[0])
        got = await asyncio.wait_for(waiter, 60)
        assert got is not None and got[0] == a[0]

    asyncio.run(go())


def test_a_freed_slot_goes_to_the_owner_holding_fewest(ring: ShmRing) -> None:
    """A stream holding both slots waits first, a single call second: the call gets the freed slot."""
    async def go() -> None:
        pool = SlotPool(ring)
        stream, call = object(), object()
        s1 = await pool.acquire(time.time() + 60, stream)
        await pool.acquire(time.time() + 60, stream)
        assert pool.held(stream) == 2
        stream_waits = asyncio.ensure_future(pool.acquire(time.time() + 600, stream))
        await asyncio.sleep(0)
        call_waits = asyncio.ensure_future(pool.acquire(time.time() + 600, call))
        await asyncio.sleep(0)
        pool.release(s1[0])
        assert (await asyncio.wait_for(call_waits, 60))[0] == s1[0]
        assert not stream_waits.done() and pool.held(call) == 1 and pool.held(stream) == 1
        stream_waits.cancel()

    asyncio.run(go())


def test_a_slot_is_not_released_while_a_thread_still_writes_into_it(ring: ShmRing) -> None:
    async def go() -> None:
        pool = SlotPool(ring)
        a = await pool.acquire(time.time() + 60)
        writing: concurrent.futures.Future = concurrent.futures.Future()
        writing.set_running_or_notify_cancel()  # running: it can no longer be cancelled
        pool.release_after(a[0], writing)
        assert ring.free_slots == 1  # still held
        writing.set_result(None)
        for _ in range(100):  # the release is scheduled on this loop by the thread's callback
            await asyncio.sleep(0)
            if ring.free_slots == 2:
                break
        assert ring.free_slots == 2

    asyncio.run(go())
