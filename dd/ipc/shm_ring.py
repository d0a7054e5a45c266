"""A bounded ring of fixed-size slots in POSIX shared memory, owned by one frontend.

The frontend decodes each request's pixels straight into a free slot; a worker
maps the same segment and reads the slot in place (a numpy view, and on GPUs a
pinned host buffer for the copy to the device). Pixels cross the process
boundary once, here, and nowhere else.

Each slot carries a generation number in the segment's header. The frontend
bumps it whenever it hands the slot out again (or takes a request back from a
worker it gave up on), and a worker checks it before trusting what it read, so
a late message about an old request can never act on a new one.

Each slot's state (free or in use) lives in the header too, not only in the
frontend's memory, so that anything on the host that may read the segment (an
operator, the soak script, the tests) can see how full a ring is and prove that
no slot leaked: `ring_usage(tag)`.

Segments are created with mode 0600 through /dev/shm directly rather than with
multiprocessing.shared_memory: attaching with the latter registers the segment
with Python's resource tracker, which unlinks it (and warns) when the *reader*
exits -- the 3.11 pitfall that would delete a frontend's ring under its feet.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import re
import shutil
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dd.procutil import pid_alive

if TYPE_CHECKING:
    import numpy as np
# numpy is imported where a ring is mapped, not here: the supervisor uses only this module's
# housekeeping (sizes, names, stale segments), and importing numpy would delay every child's start
# (numpy's import: 0.16 s under -X importtime on the 2-core CI box; BENCHMARKS.md, "Start-up on the CPU
# box, session 7").

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
MAGIC = b"DDRING02"
VERSION = 2
# magic, version, slots, slot_bytes, data_offset, creator pid; then `slots` uint64 generations
# and `slots` uint8 states (FREE or IN_USE), then the page-aligned data area.
_HEADER = struct.Struct("<8sIIQQQ")
_PAGE = 4096
FREE, IN_USE = 0, 1
# Segment names this package creates: dd-<run tag>-<role>-<pid>. Anything else is refused on
# attach, so a name in a control message can never point a worker at another file.
_NAME_RE = re.compile(r"^dd-[0-9a-f]{10}-[a-z]{1,16}-[0-9]{1,10}$")


class RingError(RuntimeError):
    """The ring cannot be created or read; the message says what to change."""


def _round_up(n: int, to: int = _PAGE) -> int:
    return (n + to - 1) // to * to


def _data_offset(slots: int) -> int:
    return _round_up(_HEADER.size + 9 * slots)


def ring_size(slots: int, slot_bytes: int) -> int:
    """Bytes of /dev/shm a ring of this shape takes, header included."""
    slot_bytes = _round_up(slot_bytes)
    return _data_offset(slots) + slots * slot_bytes


def valid_segment_name(name: str) -> bool:
    return bool(_NAME_RE.match(name))


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


def _allocate_pages(fd: int, size: int, name: str) -> None:
    """The segment's pages, allocated now by its frontend rather than one by one as they are first touched.

    Why: a GPU worker page-locks each ring before it says it is ready, and page-locking a fresh segment
    allocated and zeroed every page in the worker's thread: 280 ms for four rings of 128 MiB on an H200
    host against 25 ms once they are allocated (S19-5). A frontend's ring exists seconds before its worker
    needs it, so the frontend does it in a thread of its own while it starts (0.5 ms a MiB on the CI box). The
    pages are also reserved: a /dev/shm that fills up later can no longer stop a frontend with SIGBUS at
    its first large image. posix_fallocate releases the GIL and keeps the contents (zeros; the header)."""
    t0 = time.perf_counter()
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        log.warning("cannot allocate the %d MiB of ring %s ahead (%s); its pages are allocated as they are "
                    "first used, and a full /dev/shm then stops this process with SIGBUS", size >> 20, name,
                    exc.strerror or exc)
    else:
        log.debug("allocated the %d MiB of ring %s in %.3f s", size >> 20, name, time.perf_counter() - t0)
    finally:
        os.close(fd)


class ShmRing:
    """A mapped ring segment. The creating frontend allocates slots; workers only read."""

    def __init__(self, name: str, mm: mmap.mmap, owner: bool) -> None:
        self.name = name
        self._mm = mm
        self.owner = owner
        self.retired = False  # a worker sets it once the ring's frontend is gone
        self.populating: threading.Thread | None = None  # the creator's: allocating the pages (create)
        magic, version, slots, slot_bytes, data_offset, pid = _HEADER.unpack_from(mm, 0)
        if magic != MAGIC or version != VERSION:
            raise RingError(f"shared memory segment {name!r} is not a deep-detection ring of this version "
                            "(bad header); is an older server still running with the same run directory?")
        if (slots < 1 or slot_bytes < 1 or data_offset != _data_offset(slots)
                or data_offset + slots * slot_bytes > len(mm)):
            raise RingError(f"shared memory segment {name!r} has an inconsistent header "
                            f"({slots} slots of {slot_bytes} bytes in {len(mm)} bytes)")
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.creator_pid = pid
        self._data_offset = data_offset
        self._header_views()
        self._free: deque[int] = deque(range(slots)) if owner else deque()

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
        except PermissionError as exc:
            raise RingError(f"cannot create {path}: {exc.strerror}; /dev/shm must be writable") from exc
        try:
            os.fchmod(fd, 0o600)  # the umask must not widen it, nor narrow it for us
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        _HEADER.pack_into(mm, 0, MAGIC, VERSION, slots, slot_bytes, _data_offset(slots), os.getpid())
        try:
            ring = cls(name, mm, owner=True)
        except BaseException:
            os.close(fd)
            raise
        ring.populating = threading.Thread(target=_allocate_pages, args=(fd, size, name), daemon=True,
                                           name="ring-pages")
        ring.populating.start()  # owns fd from here
        return ring

    @classmethod
    def attach(cls, name: str, writable: bool = True, populate: bool = False) -> "ShmRing":
        """Maps an existing ring. Workers map it writable (CUDA registers it as pinned memory);
        observers (ring_usage) read only. populate: the page tables of the whole ring filled now
        (MAP_POPULATE), for a worker whose engine page-locks it before it says it is ready."""
        if not valid_segment_name(name):
            raise RingError(f"{name!r} is not a deep-detection ring name (dd-<run>-<role>-<pid>)")
        path = SHM_DIR / name
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW)
        except FileNotFoundError as exc:
            raise RingError(f"shared memory segment {name!r} does not exist (its frontend has stopped)") from exc
        try:
            size = os.fstat(fd).st_size
            if size < _HEADER.size:
                raise RingError(f"shared memory segment {name!r} is too small to be a ring")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            # A GPU worker's page tables for the whole ring, filled here (its I/O thread, at the frontend's
            # first ping, while the engine loads; the GIL is released) rather than when the engine page-locks
            # the ring before it is ready (S19-6: 0.15-0.20 s for four 128 MiB rings whose pages were
            # allocated; S19-7: 0.02-0.04 s with this). A CPU worker touches only the slots it reads.
            flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
            mm = mmap.mmap(fd, size, flags, prot)
        finally:
            os.close(fd)
        try:
            return cls(name, mm, owner=False)
        except BaseException:
            mm.close()
            raise

    # -- slots ---------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return len(self._free)

    def in_use_slots(self) -> int:
        """Slots handed out and not yet given back, as the header says (any process may ask)."""
        import numpy as np

        return int(np.count_nonzero(self.states))

    def allocate(self) -> tuple[int, int] | None:
        """A free slot and its new generation, or None when the ring is full (O(1))."""
        if not self._free:
            return None
        slot = self._free.popleft()
        self.states[slot] = IN_USE
        return slot, self.bump(slot)

    def bump(self, slot: int) -> int:
        """Invalidates every message about the slot's current contents; returns the new generation."""
        gen = int(self.generations[slot]) + 1
        self.generations[slot] = gen
        return gen

    def free(self, slot: int) -> None:
        """Gives a slot back. Freeing a free slot is a bug in the caller and raises."""
        if self.states[slot] != IN_USE:
            raise RingError(f"slot {slot} of ring {self.name} freed twice")
        self.states[slot] = FREE
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
        import numpy as np

        dtype = np.dtype(dtype)
        if not 0 <= slot < self.slots:
            raise RingError(f"slot {slot} out of range for ring {self.name} ({self.slots} slots)")
        if any(s < 0 for s in shape):
            raise RingError(f"array shape {list(shape)} has a negative dimension")
        nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
        if offset < 0 or offset + nbytes > self.slot_bytes:
            raise RingError(f"array of {nbytes} bytes at offset {offset} does not fit a slot of {self.slot_bytes}")
        start = self._data_offset + slot * self.slot_bytes + offset
        # np.frombuffer holds the map's buffer (a memoryview) while the view lives, so that close() leaves
        # the map to it; np.ndarray(buffer=) kept only a reference, and close() would unmap under it.
        return np.frombuffer(self._mm, dtype=dtype, count=math.prod(shape), offset=start).reshape(shape)

    @property
    def mapping(self) -> mmap.mmap:
        """The mapping the ring's arrays are views of (what an engine may have page-locked)."""
        return self._mm

    # -- teardown -------------------------------------------------------------------
    def _header_views(self) -> None:
        import numpy as np

        self.generations = np.frombuffer(self._mm, dtype=np.uint64, count=self.slots, offset=_HEADER.size)
        self.states = np.frombuffer(self._mm, dtype=np.uint8, count=self.slots, offset=_HEADER.size + 8 * self.slots)

    def close(self) -> None:
        # Drop our own views before closing the map: no reference to them may stay alive here (one kept
        # in a local variable made every close fail, and a worker kept the rings of frontends long gone).
        self.generations = None  # type: ignore[assignment]
        self.states = None  # type: ignore[assignment]
        try:
            self._mm.close()
        except BufferError:
            # Another view (a queued request's pixels, a pinned registration) is still alive: the
            # map stays until it goes, and so must the header, for generation checks on it.
            self._header_views()

    def unlink(self) -> None:
        (SHM_DIR / self.name).unlink(missing_ok=True)


def segment_name(tag: str, role: str, pid: int | None = None) -> str:
    """Segment names carry the run's tag and the creator's pid so stale ones can be found and removed."""
    return f"dd-{tag}-{role}-{pid if pid is not None else os.getpid()}"


def run_segments(tag: str) -> list[str]:
    """Names of the segments in /dev/shm that belong to the run with this tag."""
    if not SHM_DIR.is_dir():
        return []
    return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(f"dd-{tag}-"))


@dataclass
class RingUsage:
    name: str
    pid: int
    slots: int
    in_use: int
    bytes: int  # size of the segment in /dev/shm
    generations: int  # sum of the slots' generations: grows by 2 for each request the ring served


def ring_usage(tag: str) -> list[RingUsage]:
    """How full each ring of a run is, read from the segments themselves (read-only).

    This is how an operator, the soak script and the tests see that no slot
    leaked: after the load stops, every ring's in_use must go back to 0.
    From a shell: python -c "from dd.ipc.shm_ring import ring_usage; print(ring_usage('TAG'))"
    where TAG is the run's tag (dd.ipc.endpoints.run_tag(run_dir), also in the segment names).
    """
    out = []
    for name in run_segments(tag):
        try:
            ring = ShmRing.attach(name, writable=False)
        except (RingError, OSError):
            continue  # removed meanwhile, or not a ring of this version
        try:
            out.append(RingUsage(name, ring.creator_pid, ring.slots, ring.in_use_slots(), len(ring._mm),
                                 int(ring.generations.sum())))
        finally:
            ring.close()
    return out


def remove_stale_segments(tag: str, only_dead: bool = True) -> list[str]:
    """Removes this run's segments whose creating process is gone (or all of them)."""
    removed = []
    for name in run_segments(tag):
        pid_text = name.rsplit("-", 1)[-1]
        if only_dead and pid_text.isdigit() and pid_alive(int(pid_text)):
            continue
        try:
            (SHM_DIR / name).unlink()
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed
