"""Slots of the frontend's ring, handed to requests in arrival order, waited for up to a deadline.

Why not an asyncio.Condition: releasing must be synchronous (it runs in
`finally` blocks of cancelled tasks and in callbacks from decode threads, where
awaiting a lock can itself be cancelled and lose the wake-up), and a released
slot must go to the request that has waited longest rather than to whichever
task runs next (otherwise a steady stream of new requests starves old ones).

A slot is never released while a decode thread may still write into it: a
request cancelled mid-decode (client gone, deadline passed) gives its slot back
when the thread finishes, not when the task is cancelled. Releasing it earlier
let the next request's pixels be overwritten by the cancelled one's, so that
request got an answer computed from another image.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import deque

from dd.ipc.shm_ring import ShmRing


class SlotPool:
    def __init__(self, ring: ShmRing) -> None:
        self.ring = ring
        self._waiters: deque[asyncio.Future] = deque()

    async def acquire(self, give_up_at: float) -> tuple[int, int] | None:
        """(slot, generation), or None if no slot came free before time.time() reached give_up_at."""
        if not self._waiters:
            got = self.ring.allocate()
            if got is not None:
                return got
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self._waiters.append(fut)
        timer = loop.call_later(max(0.0, give_up_at - time.time()), _resolve, fut, None)
        try:
            return await fut
        except asyncio.CancelledError:
            # Cancelled just after being handed a slot: pass it on, or it would leak.
            if fut.done() and not fut.cancelled() and fut.result() is not None:
                self.release(fut.result()[0])
            raise
        finally:
            timer.cancel()

    def release(self, slot: int) -> None:
        """Gives the slot back and hands free slots to the longest waiters. Synchronous, never blocks."""
        self.ring.free(slot)
        while self._waiters and self.ring.free_slots:
            fut = self._waiters.popleft()
            if fut.done():  # timed out or cancelled meanwhile
                continue
            fut.set_result(self.ring.allocate())

    def release_after(self, slot: int, work: concurrent.futures.Future | None) -> None:
        """Releases the slot now, or when `work` (a thread writing into it) has finished."""
        if work is None or work.done() or work.cancel():
            self.release(slot)
            return
        loop = asyncio.get_running_loop()

        def done(_: concurrent.futures.Future) -> None:
            try:
                loop.call_soon_threadsafe(self.release, slot)
            except RuntimeError:
                pass  # the loop has closed: the frontend is gone, and its ring with it

        work.add_done_callback(done)


def _resolve(fut: asyncio.Future, value: object) -> None:
    if not fut.done():
        fut.set_result(value)
