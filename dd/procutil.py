"""Process plumbing shared by the supervisor, the workers and the frontends."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
# Set by the supervisor for each child: the name of its log file under --log-dir (NAME.log).
LOG_NAME_ENV = "DD_LOG_NAME"


def die_with_parent(parent_pid: int | None) -> None:
    """Ask Linux to SIGTERM this process when its parent dies, so no orphan keeps a GPU.

    Checked once more right after, for a parent that died before the call.
    """
    if not parent_pid:
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not glibc; the parent watch in each process's loop still catches it
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def parent_alive(parent_pid: int | None) -> bool:
    return not parent_pid or os.getppid() == parent_pid


def setup_logging(level: str, name: str, log_dir: str = "") -> None:
    """One line a record, prefixed by the process's role, to stderr or to LOG_DIR/NAME.log.

    Under the supervisor NAME comes from DD_LOG_NAME (frontend-0, worker-MODEL.0, ...): the same
    file the supervisor sends the child's stderr to, so tracebacks and native libraries' messages
    land beside the log records of the process they came from.
    """
    name = os.environ.get(LOG_NAME_ENV) or name
    handler: logging.Handler
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        handler = logging.FileHandler(os.path.join(log_dir, f"{name}.log"))
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{name}] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def parse_cpulist(text: str) -> list[int]:
    """Linux's cpulist format (\"0-3,8,10-11\"), as in sysfs local_cpulist and taskset."""
    cpus: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            cpus.extend(range(int(a), int(b) + 1))
        elif part:
            cpus.append(int(part))
    return cpus
