"""Where a run's sockets live: a private run directory (0700) of ipc:// endpoints.

Frontends find workers by listing this directory, so the processes can be
started one by one (systemd, Kubernetes) as well as by the supervisor.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from dd.procutil import pid_alive

WORKER_PREFIX = "worker."
WORKER_SUFFIX = ".ipc"
LOAD_FAILURE_SUFFIX = ".load-failed"
FRONTEND_PREFIX = "frontend."
REPLIES_SUFFIX = ".replies.ipc"
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 107


class EndpointError(RuntimeError):
    """The run directory or a socket path is unusable; the message says what to change."""


def prepare_run_dir(path: Path) -> Path:
    """Creates the run directory private to this user (0700), or checks an existing one is."""
    path = path.resolve() if path.exists() else path
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except FileExistsError:
        raise EndpointError(f"run directory {path} is a file, not a folder; choose another --run-dir") from None
    except OSError as exc:
        raise EndpointError(f"cannot create the run directory {path} ({exc.strerror or exc}); choose another "
                            "--run-dir") from None
    if st.st_uid != os.getuid():
        raise EndpointError(f"run directory {path} belongs to uid {st.st_uid}, not to this user; choose another --run-dir")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def run_tag(run_dir: Path) -> str:
    """A short name for this run, used in shared-memory segment names."""
    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:10]


def worker_socket(run_dir: Path, model: str, index: int) -> Path:
    path = run_dir / f"{WORKER_PREFIX}{model}.{index}{WORKER_SUFFIX}"
    if len(str(path)) > _MAX_SOCKET_PATH:
        raise EndpointError(f"socket path {path} is longer than {_MAX_SOCKET_PATH} bytes (a Unix limit); "
                            "choose a shorter --run-dir")
    return path


def frontend_reply_socket(run_dir: Path, identity: bytes) -> Path | None:
    """Where a frontend receives the replies that workers' inference threads send it directly
    (messages.Ping.reply_to); None where that path would be too long for a Unix socket (the replies then
    come through the workers' sockets). Not a worker socket: frontends listing the directory pass it by."""
    path = run_dir / f"{FRONTEND_PREFIX}{identity.decode()}{REPLIES_SUFFIX}"
    return path if len(str(path)) <= _MAX_SOCKET_PATH else None


def remove_reply_sockets(run_dir: Path, only_dead: bool = True) -> None:
    """Removes the frontends' reply sockets in the run directory: of frontends whose process is gone
    (a crashed one leaves its socket file), or all of them (the supervisor, at start and stop)."""
    for path in run_dir.glob(f"{FRONTEND_PREFIX}*{REPLIES_SUFFIX}"):
        pid = path.name[len(FRONTEND_PREFIX):-len(REPLIES_SUFFIX)].rpartition("-")[2]
        if only_dead and pid.isdigit() and pid_alive(int(pid)):
            continue
        path.unlink(missing_ok=True)


def load_failure_file(run_dir: Path, model: str, index: int) -> Path:
    """Where a worker whose model cannot be loaded writes why (one line), for the supervisor to report."""
    return run_dir / f"{WORKER_PREFIX}{model}.{index}{LOAD_FAILURE_SUFFIX}"


def parse_worker_socket(path: Path) -> tuple[str, int] | None:
    """(model, index) from a worker socket's file name, or None if it is not one."""
    name = path.name
    if not (name.startswith(WORKER_PREFIX) and name.endswith(WORKER_SUFFIX)):
        return None
    core = name[len(WORKER_PREFIX):-len(WORKER_SUFFIX)]
    model, _, index = core.rpartition(".")
    if not model or not index.isdigit():
        return None
    return model, int(index)


def list_worker_sockets(run_dir: Path) -> list[tuple[str, int, Path]]:
    out = []
    try:
        entries = list(run_dir.iterdir())
    except FileNotFoundError:
        return out
    for p in entries:
        parsed = parse_worker_socket(p)
        if parsed:
            out.append((parsed[0], parsed[1], p))
    return sorted(out)


def ipc_address(path: Path) -> str:
    return f"ipc://{path}"
