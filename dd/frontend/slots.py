"""Slots of the frontend's ring, shared fairly between callers, waited for up to a deadline.

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

Slots are shared fairly between callers: each request names its owner (its
DetectStream, or itself for a unary call), and when several wait, a freed slot
goes to the waiter whose owner holds the fewest slots, the longest waiter among
equals. So a stream that keeps many requests in flight cannot make a single
call of another client wait behind all of them; and since a stream never has
more requests in flight than its window (at most half the ring), there is
always a slot that it does not hold.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import Counter, deque

from dd.ipc.shm_ring import ShmRing
from dd.metrics import Recorder


class SlotPool:
    def __init__(self, ring: ShmRing, recorder: Recorder | None = None) -> None:
        self.ring = ring
        self._recorder = recorder or Recorder()  # the ring gauges (metrics); nothing when metrics are off
        self._recorder.set_ring_slots(0, ring.slots)
        self._waiters: deque[tuple[asyncio.Future, object]] = deque()
        self._held: Counter[object] = Counter()  # slots each owner holds
        self._owner: dict[int, object] = {}  # slot: its owner

    def held(self, owner: object) -> int:
        """Slots `owner` holds now."""
        return self._held.get(owner, 0)

    async def acquire(self, give_up_at: float, owner: object | None = None) -> tuple[int, int] | None:
        """(slot, generation), or None if no slot came free before time.time() reached give_up_at.

        `owner`: who the slot is for (a stream); None: this request alone.
        """
        owner = object() if owner is None else owner
        if not self._waiters:
            got = self.ring.allocate()
            if got is not None:
                self._take(got[0], owner)
                return got
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self._waiters.append((fut, owner))
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

    def _take(self, slot: int, owner: object) -> None:
        self._owner[slot] = owner
        self._held[owner] += 1
        self._count()

    def _count(self) -> None:
        self._recorder.set_ring_slots(self.ring.slots - self.ring.free_slots)

    def release(self, slot: int) -> None:
        """Gives the slot back and hands free slots to waiters, fairly. Synchronous, never blocks."""
        owner = self._owner.pop(slot, None)
        if owner is not None:
            self._held[owner] -= 1
            if self._held[owner] <= 0:
                del self._held[owner]
        self.ring.free(slot)
        self._count()
        while self.ring.free_slots:
            picked = self._next_waiter()
            if picked is None:
                return
            fut, owner = picked
            got = self.ring.allocate()
            self._take(got[0], owner)
            fut.set_result(got)

    def _next_waiter(self) -> tuple[asyncio.Future, object] | None:
        """Removes and returns the live waiter whose owner holds the fewest slots (oldest first)."""
        best: int | None = None
        best_held = 0
        dead = 0
        for i, (fut, owner) in enumerate(self._waiters):
            if fut.done():  # timed out or cancelled meanwhile
                dead += 1
                continue
            held = self._held.get(owner, 0)
            if best is None or held < best_held:
                best, best_held = i, held
                if held == 0:
                    break
        if best is None:
            self._waiters.clear()
            return None
        picked = self._waiters[best]
        del self._waiters[best]
        if dead > len(self._waiters) // 2:  # forget the dead waiters once they are half the queue
            self._waiters = deque(w for w in self._waiters if not w[0].done())
        return picked

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
