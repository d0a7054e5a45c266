"""dd.worker.batcher: batches up to the max size, in arrival order, bounded, and closed on shutdown.

No test depends on how fast threads run: where a thread is involved, the outcome is the same
whichever order the puts and the get happen in."""

from __future__ import annotations

import threading

from dd.worker.batcher import Batcher


def test_batches_are_in_order_and_at_most_the_max_size() -> None:
    b: Batcher[int] = Batcher(max_batch_size=3, max_queue_delay_s=0.0, capacity=10)
    for i in range(7):
        assert b.put(i)
    assert len(b) == 7
    assert [b.get_batch(0.0), b.get_batch(0.0), b.get_batch(0.0)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert b.get_batch(0.0) == [] and len(b) == 0


def test_a_full_queue_refuses() -> None:
    b: Batcher[int] = Batcher(2, 0.0, capacity=2)
    assert b.put(1) and b.put(2)
    assert not b.put(3)
    assert b.get_batch(0.0) == [1, 2]
    assert b.put(3)


def test_a_closed_batcher_refuses_and_hands_out_what_is_left() -> None:
    b: Batcher[int] = Batcher(4, 60.0, capacity=8)
    b.put(1)
    b.close()
    assert not b.put(2)
    assert b.get_batch(60.0) == [1]  # closing ends the wait for company at once
    assert b.get_batch(60.0) == []  # and the wait for a first item


def test_close_wakes_a_waiting_get() -> None:
    b: Batcher[int] = Batcher(4, 0.0, capacity=8)
    got: list[list[int]] = []
    t = threading.Thread(target=lambda: got.append(b.get_batch(600.0)))
    t.start()
    b.close()
    t.join(60)
    assert not t.is_alive() and got == [[]]


def test_a_batch_waits_for_company_until_it_is_full() -> None:
    """With a long queue delay, a get that has one item waits for more and returns once the batch is full."""
    b: Batcher[int] = Batcher(3, 600.0, capacity=8)
    b.put(1)
    got: list[list[int]] = []
    t = threading.Thread(target=lambda: got.append(b.get_batch(600.0)))
    t.start()
    b.put(2)
    b.put(3)
    t.join(60)
    assert not t.is_alive() and got == [[1, 2, 3]]
