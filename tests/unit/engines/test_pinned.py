"""Page-locking the input rings (dd/worker/engines/pinned.py): an optimisation that never fails a request."""

from __future__ import annotations

import logging
import mmap

import numpy as np
import pytest
import torch

from dd.worker.engines.pinned import PinnedMappings


def test_plain_arrays_and_disabled_pinning_touch_nothing() -> None:
    pinned = PinnedMappings(enabled=True)
    pinned.pin_source(np.zeros((4, 4), np.uint8))  # not in a mapping: nothing to pin
    assert pinned.enabled and not pinned._pinned
    off = PinnedMappings(enabled=False)
    m = mmap.mmap(-1, 4096)
    off.pin_source(np.ndarray((4, 4), np.uint8, buffer=m))
    assert not off._pinned
    off.release(m)  # never pinned: a no-op
    off.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path where CUDA cannot page-lock")
def test_a_mapping_that_cannot_be_pinned_switches_pinning_off_with_one_log_line(
        caplog: pytest.LogCaptureFixture) -> None:
    pinned = PinnedMappings(enabled=True)
    m = mmap.mmap(-1, 4096)
    view = np.ndarray((8, 8), np.uint8, buffer=m, offset=64)[1:]  # a view of a slot (ShmRing.view) of the ring
    with caplog.at_level(logging.WARNING, logger="dd.worker.engines.pinned"):
        pinned.pin_source(view)
        pinned.pin_source(view)
    assert not pinned.enabled and not pinned._pinned
    assert sum("cannot pin shared memory" in r.getMessage() for r in caplog.records) == 1
    pinned.release(m)  # not registered: a no-op


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path where CUDA cannot page-lock")
def test_an_array_made_by_frombuffer_is_pinned_through_its_memoryview(caplog: pytest.LogCaptureFixture) -> None:
    """np.frombuffer(mapping) keeps a memoryview, not the mapping, as its base: such arrays were copied
    from pageable memory (found by scripts/profile_worker.py: 4 ms of host time per batch of 8 on the H200)."""
    pinned = PinnedMappings(enabled=True)
    m = mmap.mmap(-1, 4096)
    view = np.frombuffer(m, np.uint8, 64, 128).reshape(8, 8)
    with caplog.at_level(logging.WARNING, logger="dd.worker.engines.pinned"):
        pinned.pin_source(view)  # reaches cudaHostRegister, which has no GPU here: pinning goes off
    assert not pinned.enabled
    assert any("cannot pin shared memory" in r.getMessage() for r in caplog.records)
