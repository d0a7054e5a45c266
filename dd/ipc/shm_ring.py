"""A bounded ring of fixed-size slots in POSIX shared memory, owned by one frontend.

The frontend decodes each request's pixels straight into a free slot; a worker
maps the same segment and reads the slot in place (a numpy view, and on GPUs a
pinned host buffer for the copy to the device). Pixels cross the process
boundary once, here, and nowhere else.

Each slot carries a generation number in the segment's header. The frontend
bumps it whenever it hands the slot out again (or takes a request back from a
worker it gave up on), and a worker checks it before trusting what it read, so
a late message about an old request can never act on a new one.

Segments are created with mode 0600 through /dev/shm directly rather than with
multiprocessing.shared_memory: attaching with the latter registers the segment
with Python's resource tracker, which unlinks it (and warns) when the *reader*
exits -- the 3.11 pitfall that would delete a frontend's ring under its feet.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import struct
from collections import deque
from pathlib import Path

import numpy as np

SHM_DIR = Path("/dev/shm")
MAGIC = b"DDRING01"
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, slots, slot_bytes, data_offset
_PAGE = 4096


class RingError(RuntimeError):
    """The ring cannot be created or read; the message says what to change."""


def _round_up(n: int, to: int = _PAGE) -> int:
    return (n + to - 1) // to * to


def ring_size(slots: int, slot_bytes: int) -> int:
    """Bytes of /dev/shm a ring of this shape takes, header included."""
    slot_bytes = _round_up(slot_bytes)
    return _round_up(_HEADER.size + 8 * slots) + slots * slot_bytes


def check_shm_capacity(needed: int, shm_dir: Path = SHM_DIR) -> None:
    """Refuses to start when /dev/shm cannot hold the rings.

    tmpfs allocates lazily, so an undersized /dev/shm would not fail at start
    but kill a process with SIGBUS on the first large image; better to say so now.
    """
    if not shm_dir.is_dir():
        raise RingError(f"{shm_dir} does not exist; deep-detection needs POSIX shared memory (Linux tmpfs)")
    free = shutil.disk_usage(shm_dir).free
    if free < needed:
        raise RingError(
            f"{shm_dir} has {free / 2**20:.0f} MiB free but the rings need {needed / 2**20:.0f} MiB. "
            "Give the container more shared memory (docker run --shm-size=2g, or a Kubernetes "
            "emptyDir with medium: Memory on /dev/shm), or lower --ring-slots, --frontends or --slot-mb."
        )


class ShmRing:
    """A mapped ring segment. The creating frontend allocates slots; workers only read."""

    def __init__(self, name: str, mm: mmap.mmap, owner: bool) -> None:
        self.name = name
        self._mm = mm
        self.owner = owner
        magic, version, slots, slot_bytes, data_offset = _HEADER.unpack_from(mm, 0)
        if magic != MAGIC or version != 1:
            raise RingError(f"shared memory segment {name!r} is not a deep-detection ring (bad header)")
        self.slots = slots
        self.slot_bytes = slot_bytes
        self._data_offset = data_offset
        self.generations = np.frombuffer(mm, dtype=np.uint64, count=slots, offset=_HEADER.size)
        self._free: deque[int] = deque(range(slots)) if owner else deque()
        self._in_use = [False] * slots if owner else []

    # -- creation and attachment -------------------------------------------------
    @classmethod
    def create(cls, name: str, slots: int, slot_bytes: int) -> "ShmRing":
        slot_bytes = _round_up(slot_bytes)
        size = ring_size(slots, slot_bytes)
        path = SHM_DIR / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError as exc:
            raise RingError(f"shared memory segment {path} already exists; another server uses this name "
                            "or a crashed run left it (remove it if no deep-detection process runs)") from exc
        try:
            os.fchmod(fd, 0o600)  # the umask must not widen it, nor narrow it for us
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        data_offset = _round_up(_HEADER.size + 8 * slots)
        _HEADER.pack_into(mm, 0, MAGIC, 1, slots, slot_bytes, data_offset)
        return cls(name, mm, owner=True)

    @classmethod
    def attach(cls, name: str) -> "ShmRing":
        path = SHM_DIR / name
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError as exc:
            raise RingError(f"shared memory segment {name!r} does not exist (its frontend has stopped)") from exc
        try:
            size = os.fstat(fd).st_size
            if size < _HEADER.size:
                raise RingError(f"shared memory segment {name!r} is too small to be a ring")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return cls(name, mm, owner=False)

    # -- slots ---------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> tuple[int, int] | None:
        """A free slot and its new generation, or None when the ring is full (O(1))."""
        if not self._free:
            return None
        slot = self._free.popleft()
        self._in_use[slot] = True
        return slot, self.bump(slot)

    def bump(self, slot: int) -> int:
        """Invalidates every message about the slot's current contents; returns the new generation."""
        gen = int(self.generations[slot]) + 1
        self.generations[slot] = gen
        return gen

    def free(self, slot: int) -> None:
        """Gives a slot back. Freeing a free slot is a bug in the caller and raises."""
        if not self._in_use[slot]:
            raise RingError(f"slot {slot} of ring {self.name} freed twice")
        self._in_use[slot] = False
        self.bump(slot)
        self._free.append(slot)

    def generation(self, slot: int) -> int:
        return int(self.generations[slot])

    def slot_buffer(self, slot: int) -> memoryview:
        if not 0 <= slot < self.slots:
            raise RingError(f"slot {slot} out of range for ring {self.name} ({self.slots} slots)")
        start = self._data_offset + slot * self.slot_bytes
        return memoryview(self._mm)[start:start + self.slot_bytes]

    def array(self, slot: int, offset: int, shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
        """A view of part of a slot as an array; no copy."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset < 0 or offset + nbytes > self.slot_bytes:
            raise RingError(f"array of {nbytes} bytes at offset {offset} does not fit a slot of {self.slot_bytes}")
        start = self._data_offset + slot * self.slot_bytes + offset
        return np.ndarray(shape, dtype=dtype, buffer=self._mm, offset=start)

    def data_region(self) -> tuple[memoryview, int]:
        """The whole data area, for registering it once as pinned memory with CUDA."""
        return memoryview(self._mm)[self._data_offset:], self.slots * self.slot_bytes

    # -- teardown -------------------------------------------------------------------
    def close(self) -> None:
        self.generations = None  # type: ignore[assignment]  # drop the view before closing the map
        try:
            self._mm.close()
        except BufferError:
            # A numpy view is still alive somewhere; the map goes when it does.
            pass

    def unlink(self) -> None:
        (SHM_DIR / self.name).unlink(missing_ok=True)


def segment_name(tag: str, role: str, pid: int | None = None) -> str:
    """Segment names carry the run's tag and the creator's pid so stale ones can be found and removed."""
    return f"dd-{tag}-{role}-{pid if pid is not None else os.getpid()}"


def remove_stale_segments(tag: str, only_dead: bool = True) -> list[str]:
    """Removes this run's segments whose creating process is gone (or all of them)."""
    removed = []
    prefix = f"dd-{tag}-"
    if not SHM_DIR.is_dir():
        return removed
    for entry in SHM_DIR.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid_text = entry.name.rsplit("-", 1)[-1]
        if only_dead and pid_text.isdigit() and _pid_alive(int(pid_text)):
            continue
        try:
            entry.unlink()
            removed.append(entry.name)
        except FileNotFoundError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True
