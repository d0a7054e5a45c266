"""Client shared-memory segments: the checks every process does before it touches one.

A local client creates a POSIX shared-memory segment (shm_open: /dev/shm/<key>) and registers a
range of it (dd/frontend/client_shm.py); frontends then read inputs from it and workers write
outputs into it. Both open the segment through open_segment, which refuses anything but a
regular file directly in /dev/shm (no path, no symlink: O_NOFOLLOW), owned by the user that runs
the server (a client of another user must not make the server read its memory, nor write where
that user could not), and large enough. The registrations live in <run_dir>/client_shm/; the
supervisor removes them at start and at stop (remove_registrations).

Refusals are SegmentError(code, message), code a gRPC status name, so that this module stays
below the frontend and the worker.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

SHM_DIR = Path("/dev/shm")  # where Linux's shm_open keeps POSIX shared-memory segments
SUBDIR = "client_shm"  # the registrations, in the run directory
MAX_KEY_CHARS = 255  # NAME_MAX


class SegmentError(Exception):
    """A segment that cannot be used: `code` (a gRPC status name) and a message for the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def segment_path(key: str) -> Path:
    """/dev/shm/<key> for a POSIX shm key ("/name" as shm_open takes it, or "name"); refuses anything
    that is not one plain name (no further '/', no '..', no NUL)."""
    name = key[1:] if key.startswith("/") else key
    if not name or len(name) > MAX_KEY_CHARS or "/" in name or "\0" in name or name in (".", ".."):
        raise SegmentError("INVALID_ARGUMENT", f"shared-memory key {key[:80]!r} is not a POSIX shared-memory name; "
                           "give the key the client passed to shm_open, e.g. '/my_region' (one name of at most "
                           "255 characters, no other '/')")
    return SHM_DIR / name


def open_segment(key: str, need: int, uid: int, writable: bool) -> tuple[int, int]:
    """(fd, size) of the segment `key` after the checks every access needs: a regular file in /dev/shm,
    not a symlink, owned by `uid`, at least `need` bytes. The caller closes fd."""
    path = segment_path(key)
    try:
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SegmentError("INVALID_ARGUMENT", f"shared-memory key {key!r} does not exist ({path}); create it first "
                           "(shm_open, or tritonclient.utils.shared_memory.create_shared_memory_region) and "
                           "register it then") from None
    except OSError as exc:
        raise SegmentError("PERMISSION_DENIED", f"cannot open shared-memory key {key!r} ({path}): {exc.strerror}; "
                           f"it must be a segment of the user that runs the server (uid {uid}), readable and "
                           "writable by it") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SegmentError("INVALID_ARGUMENT", f"shared-memory key {key!r} ({path}) is not a shared-memory segment")
        if st.st_uid != uid:
            raise SegmentError("PERMISSION_DENIED", f"shared-memory key {key!r} belongs to uid {st.st_uid}, not to "
                               f"the user that runs the server (uid {uid}); only segments of the server's own user "
                               "can be used")
        if st.st_size < need:
            raise SegmentError("INVALID_ARGUMENT", f"shared-memory key {key!r} holds {st.st_size} bytes, but the "
                               f"region needs {need} (offset + byte_size); use a range inside the segment")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def remove_registrations(run_dir: Path) -> int:
    """Removes every client shared-memory registration of the run directory (the supervisor, at start
    and at stop); the clients' segments themselves are theirs and stay."""
    directory = Path(run_dir) / SUBDIR
    n = 0
    if directory.is_dir():
        for path in directory.iterdir():
            path.unlink(missing_ok=True)
            n += 1
        directory.rmdir()
    return n
