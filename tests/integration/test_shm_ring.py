"""The shared-memory ring on its own: slots, generations, the in-use state others can read, permissions."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dd.ipc.shm_ring import (SHM_DIR, RingError, ShmRing, check_shm_capacity, remove_stale_segments, ring_size,
                             ring_usage, segment_name, valid_segment_name)

TAG = "feedc0ffee"  # a run tag no real run has (tags are hex digests of the run directory)


@pytest.fixture
def ring():
    name = segment_name(TAG, "fe")
    (SHM_DIR / name).unlink(missing_ok=True)
    r = ShmRing.create(name, slots=4, slot_bytes=10_000)
    yield r
    r.close()
    r.unlink()


def test_allocate_free_and_generations(ring: ShmRing) -> None:
    got = [ring.allocate() for _ in range(4)]
    assert sorted(s for s, _ in got) == [0, 1, 2, 3]
    assert ring.allocate() is None  # full
    slot, gen = got[0]
    assert ring.generation(slot) == gen
    ring.free(slot)
    assert ring.generation(slot) > gen  # a late message about the old contents no longer matches
    with pytest.raises(RingError, match="freed twice"):
        ring.free(slot)
    assert ring.allocate()[0] == slot


def test_in_use_state_is_visible_to_other_processes(ring: ShmRing) -> None:
    """What tests, the soak script and operators rely on to prove that no slot leaked."""
    a, _ = ring.allocate()
    ring.allocate()
    code = ("from dd.ipc.shm_ring import ShmRing; r = ShmRing.attach(%r, writable=False); "
            "print(r.in_use_slots(), r.slots, r.creator_pid)" % ring.name)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["2", "4", str(os.getpid())]
    ring.free(a)
    (usage,) = [u for u in ring_usage(TAG) if u.name == ring.name]
    assert (usage.in_use, usage.slots, usage.pid) == (1, 4, os.getpid())
    assert usage.bytes == ring_size(4, 10_000)


def test_worker_view_reads_what_the_frontend_wrote(ring: ShmRing) -> None:
    slot, gen = ring.allocate()
    img = np.arange(6 * 7 * 3, dtype=np.uint8).reshape(6, 7, 3)
    np.copyto(np.ndarray(img.shape, np.uint8, buffer=ring.slot_buffer(slot)), img)
    other = ShmRing.attach(ring.name)
    try:
        assert other.generation(slot) == gen
        assert np.array_equal(other.array(slot, 0, (6, 7, 3), "uint8"), img)
        with pytest.raises(RingError, match="does not fit"):
            other.array(slot, 0, (10_000, 2), "uint8")
        with pytest.raises(RingError, match="negative"):
            other.array(slot, 0, (-1, 4), "uint8")
        with pytest.raises(RingError, match="out of range"):
            other.array(99, 0, (1,), "uint8")
    finally:
        other.close()


def test_segment_is_0600_whatever_the_umask() -> None:
    name = segment_name(TAG, "fe", pid=1)
    (SHM_DIR / name).unlink(missing_ok=True)
    old = os.umask(0)
    try:
        r = ShmRing.create(name, 2, 4096)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(SHM_DIR / name).st_mode) == 0o600
    finally:
        r.close()
        r.unlink()


def test_attach_refuses_foreign_names_and_bad_headers(tmp_path) -> None:
    for name in ("../../etc/passwd", "dd-feedc0ffee-fe-1/../x", "something", ""):
        assert not valid_segment_name(name)
        with pytest.raises(RingError, match="not a deep-detection ring name"):
            ShmRing.attach(name)
    name = segment_name(TAG, "fe", pid=2)
    path = SHM_DIR / name
    path.write_bytes(b"\0" * 8192)
    try:
        with pytest.raises(RingError, match="not a deep-detection ring"):
            ShmRing.attach(name)
    finally:
        path.unlink()


def test_stale_segments_of_dead_processes_are_removed() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = SHM_DIR / segment_name(TAG, "fe", pid=dead.pid)
    live = SHM_DIR / segment_name(TAG, "fe", pid=os.getpid())
    for p in (stale, live):
        p.write_bytes(b"x")
    try:
        removed = remove_stale_segments(TAG, only_dead=True)
        assert stale.name in removed and not stale.exists()
        assert live.exists()
        assert live.name in remove_stale_segments(TAG, only_dead=False)
    finally:
        for p in (stale, live):
            p.unlink(missing_ok=True)


def test_capacity_check_says_how_to_fix_it(tmp_path) -> None:
    with pytest.raises(RingError, match="--shm-size"):
        check_shm_capacity(1 << 62, tmp_path)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), max_size=60))
def test_in_use_count_matches_the_frontends_books(ops: list[bool]) -> None:
    """Any sequence of allocations and frees: the header's count is what the frontend holds."""
    name = segment_name(TAG, "prop")
    (SHM_DIR / name).unlink(missing_ok=True)
    r = ShmRing.create(name, 3, 4096)
    held: list[int] = []
    try:
        for alloc in ops:
            if alloc:
                got = r.allocate()
                assert (got is None) == (len(held) == 3)
                if got:
                    held.append(got[0])
            elif held:
                r.free(held.pop(0))
            assert r.in_use_slots() == len(held) == r.slots - r.free_slots
    finally:
        r.close()
        r.unlink()


def test_close_with_a_live_view_keeps_the_header_usable(ring: ShmRing) -> None:
    """A worker closes a dead frontend's ring while a queued request still holds a view of its
    pixels; the generation check on that request must still work (it raised TypeError before)."""
    slot, gen = ring.allocate()
    pixels = ring.array(slot, 0, (10, 10), "uint8")  # a queued request's view
    ring.close()
    assert ring.generation(slot) == gen
    del pixels


def test_the_frontend_allocates_the_rings_pages_as_it_creates_it() -> None:
    """A GPU worker page-locks each ring before it is ready; on a segment whose pages were never touched
    that allocated and zeroed them all in the worker (280 ms for four 128 MiB rings on an H200 against 25 ms once allocated, S19-5).
    The creator allocates them instead, in a thread of its own: the file holds every page, and what the
    creator wrote meanwhile (the header) is intact."""
    name = segment_name(TAG, "fe")
    (SHM_DIR / name).unlink(missing_ok=True)
    r = ShmRing.create(name, slots=8, slot_bytes=4 << 20)
    try:
        assert r.populating is not None
        r.populating.join(60)
        size = ring_size(8, 4 << 20)
        assert os.stat(SHM_DIR / name).st_blocks * 512 >= size  # allocated, not a sparse file
        seen = ShmRing.attach(name)
        assert (seen.slots, seen.slot_bytes, seen.creator_pid) == (8, 4 << 20, os.getpid())
        seen.close()
    finally:
        r.close()
        r.unlink()


def _resident_kib(path: str) -> int:
    """This process's resident KiB of its mappings of path (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
            inside = line.rstrip().endswith(path)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_a_gpu_worker_maps_a_ring_with_its_page_tables_filled() -> None:
    """A worker attaches a ring at its frontend's first ping, while its engine loads; a GPU worker's page
    tables are filled then (MAP_POPULATE) rather than when the engine page-locks the ring before it is ready
    (S19-6). An observer's read-only mapping is not filled, nor a CPU worker's (it touches the slots it reads)."""
    name = segment_name(TAG, "fe")
    (SHM_DIR / name).unlink(missing_ok=True)
    r = ShmRing.create(name, slots=4, slot_bytes=4 << 20)
    try:
        r.populating.join(60)
        # Not filled: the header's pages and what the kernel maps around a fault (fault_around_bytes, 64 KiB
        # by default; a huge page, 2 MiB, where /dev/shm has them), far from the ring's 16 MiB.
        little = ring_size(4, 4 << 20) // 1024 // 4
        cpu_worker = ShmRing.attach(name)
        assert _resident_kib(str(SHM_DIR / name)) < little
        cpu_worker.close()
        worker = ShmRing.attach(name, populate=True)
        assert _resident_kib(str(SHM_DIR / name)) >= ring_size(4, 4 << 20) // 1024  # the worker's, whole
        observer = ShmRing.attach(name, writable=False)
        worker.close()
        r.close()
        assert worker.mapping.closed and r.mapping.closed
        assert _resident_kib(str(SHM_DIR / name)) < little  # the observer's: the header it read
        observer.close()
    finally:
        r.close()
        r.unlink()


def test_close_unmaps_the_ring_unless_a_view_of_it_is_alive(ring: ShmRing) -> None:
    """close() kept a reference to the header's views while it closed the map, so the map never closed:
    a worker kept the rings of frontends long gone mapped (their /dev/shm memory with them)."""
    worker = ShmRing.attach(ring.name)
    pixels = worker.slot_buffer(0)  # a queued request's pixels: the map must stay
    worker.close()
    assert not worker.mapping.closed and worker.generation(0) == ring.generation(0)
    pixels.release()
    worker.close()
    assert worker.mapping.closed
