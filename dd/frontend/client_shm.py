"""Client system shared memory: regions a local client registers, and checked access to them.

Triton's system shared-memory extension (SystemSharedMemoryRegister/Status/Unregister): a client
on the same host creates a POSIX shared-memory segment (shm_open: /dev/shm/<key>), registers a
range of it under a name, and then names that region in its requests instead of sending the
tensor bytes. Off unless the server runs with --allow-client-shm (ServerConfig.allow_client_shm).

Why registrations are files: the frontends are separate processes sharing one port, so a
Register landing on one must be seen by a ModelInfer landing on another. Each registration is a
small JSON file in `<run_dir>/client_shm/` (the run directory is 0700), written atomically
(write, then link: a name registered by two frontends at once is registered once) and looked at on
every use: a stat of its file, and a read only when the file is another one than last time (a request
names up to six regions; reading and parsing each file cost ~30 us, the stat ~3 us). Each process
caches its mapping of a segment and drops it when the registration file is gone or names something else. The supervisor removes the
run directory's registrations at start and at stop (remove_registrations), so none outlive a run.

Checks, at register and again whenever a process maps a segment:
  - the key names a regular file directly in /dev/shm (no path, no symlink: O_NOFOLLOW);
  - it is owned by the user that runs the server: a local client of another user must not make
    the server read its memory, nor make it write where that user lacks permission;
  - it holds offset + byte_size bytes.
Every access (view) is bounded by the registered range, and the segment's actual size is
checked again first (a client may shrink its segment after registering).

This module knows no protocol: errors are ServeError(Status.X, message) for the adapter to map.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from dd.frontend.errors import ServeError, Status
from dd.ipc import client_segments
from dd.ipc.client_segments import SUBDIR, SegmentError, remove_registrations

__all__ = ["ClientShmRegistry", "Region", "SUBDIR", "remove_registrations"]

MAX_REGIONS = 256  # registrations per server: the run directory holds a bounded number of files
MAX_NAME_CHARS = 256


@dataclass(frozen=True)
class Region:
    """One registration, as stored in its file and as SystemSharedMemoryStatus reports it."""

    name: str
    key: str
    offset: int
    byte_size: int
    token: str = ""  # new at each Register: tells a process that its cached mapping is of an older registration


def _invalid(message: str) -> ServeError:
    return ServeError(Status.INVALID_ARGUMENT, message)


def open_segment(key: str, need: int, uid: int, writable: bool) -> tuple[int, int]:
    """dd.ipc.client_segments.open_segment, its refusals as ServeError."""
    try:
        return client_segments.open_segment(key, need, uid, writable)
    except SegmentError as exc:
        raise ServeError(Status.from_name(exc.code), exc.message) from None


class _Mapping:
    """This process's mapping of one registration's segment."""

    def __init__(self, region: Region, uid: int, writable: bool) -> None:
        self.region = region
        self.fd, size = open_segment(region.key, region.offset + region.byte_size, uid, writable)
        try:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, prot) if size else None
        except BaseException:
            os.close(self.fd)
            raise

    def segment_size(self) -> int:
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:
                pass  # a request still reads it: the mapping goes when its last view is released
            self.map = None


class ClientShmRegistry:
    """The registrations of one server (shared by its frontends through `run_dir`), and checked access.

    `uid`: the owner every segment must have (the server's effective uid)."""

    def __init__(self, run_dir: Path, uid: int | None = None, writable: bool = False) -> None:
        self.dir = Path(run_dir) / SUBDIR
        self.uid = os.geteuid() if uid is None else uid
        self.writable = writable
        self._maps: dict[str, _Mapping] = {}
        # name -> (its file, the file's identity when read, the Region read): registrations are written once
        # (a new file, linked into place) and never changed in place, so an unchanged identity is an unchanged file.
        self._read_cache: dict[str, tuple[str, tuple[int, int, int, int], Region]] = {}
        self.dir.mkdir(mode=0o700, exist_ok=True)

    # -- the files ------------------------------------------------------------------------------
    def _file(self, name: str) -> Path:
        return self.dir / (hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:40] + ".json")

    def _read(self, path: Path) -> Region | None:
        try:
            return Region(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:  # not ours, or cut short: ignore rather than fail every request
            raise ServeError(Status.INTERNAL, f"client shared-memory registration {path} is unreadable ({exc}); "
                                              "unregister the region and register it again") from None

    def _lookup(self, name: str) -> Region | None:
        cached = self._read_cache.get(name)
        path = cached[0] if cached is not None else str(self._file(name))
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._read_cache.pop(name, None)
            return None
        identity = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if cached is not None and cached[1] == identity:
            return cached[2]
        region = self._read(Path(path))
        if region is None or region.name != name:
            self._read_cache.pop(name, None)
            return None
        if len(self._read_cache) >= MAX_REGIONS:  # names of registrations gone since: forget them all
            self._read_cache.clear()
        self._read_cache[name] = (path, identity, region)
        return region

    def _all(self) -> list[Region]:
        regions = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                region = self._read(path)
            except ServeError:
                continue
            if region is not None:
                regions.append(region)
        return sorted(regions, key=lambda r: r.name)

    # -- the extension's calls -------------------------------------------------------------------
    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Checks the segment and records the registration for every frontend of this server."""
        if not name or len(name) > MAX_NAME_CHARS:
            raise _invalid(f"a shared-memory region needs a name of 1 to {MAX_NAME_CHARS} characters, "
                           f"got {len(name)}")
        if offset < 0 or byte_size <= 0:
            raise _invalid(f"region {name!r}: offset must be >= 0 and byte_size > 0, got offset {offset} and "
                           f"byte_size {byte_size}")
        if self._lookup(name) is not None:
            raise ServeError(Status.ALREADY_EXISTS, f"a shared-memory region named {name!r} is already registered; "
                                                    "unregister it first or choose another name")
        fd, _ = open_segment(key, offset + byte_size, self.uid, writable=True)  # writable: outputs may go there
        os.close(fd)
        if len(list(self.dir.glob("*.json"))) >= MAX_REGIONS:
            raise ServeError(Status.RESOURCE_EXHAUSTED, f"{MAX_REGIONS} shared-memory regions are registered "
                                                        "already (the most a server keeps); unregister some first")
        region = Region(name, key, offset, byte_size, uuid.uuid4().hex)
        path = self._file(name)
        tmp = self.dir / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(region), f)
            os.link(tmp, path)  # atomic, and fails if another frontend registered the name meanwhile
        except FileExistsError:
            raise ServeError(Status.ALREADY_EXISTS, f"a shared-memory region named {name!r} is already registered; "
                                                    "unregister it first or choose another name") from None
        finally:
            tmp.unlink(missing_ok=True)

    def unregister(self, name: str) -> None:
        """Drops `name` ("": every region). Unknown names are not an error, as in Triton."""
        paths = list(self.dir.glob("*.json")) if not name else [self._file(name)]
        for path in paths:
            path.unlink(missing_ok=True)
        for cached in [n for n in self._maps if not name or n == name]:
            self._maps.pop(cached).close()
        self.prune()

    def status(self, name: str) -> list[Region]:
        """`name`'s registration ("": every one); NOT_FOUND for a name not registered."""
        if not name:
            return self._all()
        region = self._lookup(name)
        if region is None:
            raise ServeError(Status.NOT_FOUND, f"no shared-memory region named {name!r} is registered")
        return [region]

    # -- access ------------------------------------------------------------------------------------
    def region(self, name: str, offset: int, byte_size: int) -> Region:
        """The registration `name`, after checking that [offset, offset + byte_size) lies inside it
        (offsets relative to the region, as Triton's shared_memory_offset)."""
        region = self._lookup(name)
        if region is None:
            stale = self._maps.pop(name, None)
            if stale is not None:
                stale.close()
            raise _invalid(f"no shared-memory region named {name!r} is registered; register it with "
                           "SystemSharedMemoryRegister first")
        if offset < 0 or byte_size < 0 or offset + byte_size > region.byte_size:
            raise _invalid(f"shared-memory region {name!r} holds {region.byte_size} bytes; offset {offset} + "
                           f"byte_size {byte_size} reaches outside it")
        return region

    def view(self, name: str, offset: int, byte_size: int) -> memoryview:
        """The bytes [offset, offset + byte_size) of region `name`, without a copy; never outside the
        registered range, nor past the segment's current end."""
        region = self.region(name, offset, byte_size)
        cached = self._maps.get(name)
        if cached is not None and cached.region != region:  # unregistered and registered again meanwhile
            self._maps.pop(name).close()
            cached = None
        if cached is None:
            cached = self._maps[name] = _Mapping(region, self.uid, self.writable)
        start = region.offset + offset
        if cached.segment_size() < start + byte_size or cached.map is None or len(cached.map) < start + byte_size:
            self._maps.pop(name).close()
            raise _invalid(f"shared-memory key {region.key!r} of region {name!r} is now smaller than its "
                           "registered range; register the region again")
        return memoryview(cached.map)[start:start + byte_size]

    def prune(self) -> None:
        """Drops this process's mappings of registrations that are gone."""
        for name in list(self._maps):
            if self._lookup(name) != self._maps[name].region:
                self._maps.pop(name).close()

    def close(self) -> None:
        """Drops this process's mappings (the registrations stay for the other frontends)."""
        for name in list(self._maps):
            self._maps.pop(name).close()

