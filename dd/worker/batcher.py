"""Dynamic batching: wait briefly for company, never past the queue delay, never beyond the max batch.

Bounded: put() refuses when full (the frontends' credits should keep it from
ever filling; refusing is the safety net, not the flow control).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Batcher(Generic[T]):
    def __init__(self, max_batch_size: int, max_queue_delay_s: float, capacity: int) -> None:
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.capacity = capacity
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> bool:
        with self._cond:
            if self._closed or len(self._items) >= self.capacity:
                return False
            self._items.append(item)
            self._cond.notify()
            return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def get_batch(self, timeout: float) -> list[T]:
        """Up to max_batch_size items; waits up to `timeout` for the first, then up to the queue delay for more."""
        with self._cond:
            if not self._items:
                self._cond.wait_for(lambda: self._items or self._closed, timeout)
            if not self._items:
                return []
            first_at = time.monotonic()
            while len(self._items) < self.max_batch_size and not self._closed:
                left = self.max_queue_delay_s - (time.monotonic() - first_at)
                if left <= 0:
                    break
                self._cond.wait(left)
            n = min(self.max_batch_size, len(self._items))
            return [self._items.popleft() for _ in range(n)]
