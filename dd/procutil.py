"""Process plumbing shared by the supervisor, the workers and the frontends."""

from __future__ import annotations

import ctypes
import logging
import logging.handlers
import os
import resource
import signal
import sys
from pathlib import Path

from dd.logsafe import RepeatFilter

PR_SET_PDEATHSIG = 1
# `deep-detection`'s exit status for a configuration error: a child that exits with it is not restarted
# (it would fail the same way); the supervisor stops and says why.
EXIT_CONFIG = 2
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


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user counts: it cannot be signalled)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def setup_logging(level: str, name: str, log_dir: str = "", max_mb: float = 0.0, backups: int = 3) -> None:
    """One line a record, prefixed by the process's role, to stderr or to LOG_DIR/NAME.log.

    Under the supervisor NAME comes from DD_LOG_NAME (frontend-0, worker-MODEL.0, ...): the same
    file the supervisor sends the child's stderr to, so tracebacks and native libraries' messages
    land beside the log records of the process they came from. With max_mb > 0 the file is rotated
    at that size (NAME.log.1 ... NAME.log.BACKUPS), and stderr follows it to the new file.
    Repeated records are thinned out by dd.logsafe.RepeatFilter, whatever the destination.
    """
    name = os.environ.get(LOG_NAME_ENV) or name
    handler: logging.Handler
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        path = os.path.join(log_dir, f"{name}.log")
        if max_mb > 0:
            handler = _RotatingLog(path, maxBytes=int(max_mb * 2**20), backupCount=backups)
        else:
            handler = logging.FileHandler(path)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{name}] %(message)s"))
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class _RotatingLog(logging.handlers.RotatingFileHandler):
    """A rotating log file that takes stderr along when stderr is the same file (as the supervisor
    sets it up for its children), so that native messages and tracebacks do not keep growing the
    file that was rotated away."""

    def __init__(self, path: str, **kw: int) -> None:
        super().__init__(path, **kw)
        self._stderr_follows = _same_file(2, self.stream.fileno())

    def doRollover(self) -> None:
        super().doRollover()
        if self._stderr_follows and self.stream is not None:
            os.dup2(self.stream.fileno(), 2)


def _same_file(fd_a: int, fd_b: int) -> bool:
    try:
        a, b = os.fstat(fd_a), os.fstat(fd_b)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters
M_TRIM_THRESHOLD = -1


def return_large_allocations(threshold: int = 16 << 20, keep: int = 32 << 20) -> bool:
    """Makes glibc serve allocations of `threshold` bytes and more with their own mappings, returned to
    the system when freed, and keep up to `keep` bytes freed at the top of a heap for reuse. By default
    glibc raises the threshold to the size of the largest block freed so far (up to 32 MiB), after which
    copies of request messages of tens of MB are kept in its heaps. (Sending a frontend 480 messages of
    23 MB one after the other left it at 0.8 to 1.1 GB with a threshold and 1.1 to 1.5 GB without: gRPC's
    own buffers are most of what remains.)

    Not lower: every block served by its own mapping is paid again in page faults each time it is
    touched, and a request's messages, copies and decoded images are such blocks. With a 1 MiB
    threshold, parsing and decoding a 1280x720 RGB-D request cost 5-6 ms more CPU (a RAW one 5.0 ms
    instead of 0.5; JPEG + PNG 19.2 instead of 13.5; measured on a 2-core box). False where not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, keep))
    except (OSError, AttributeError):
        return False


def raise_open_files_limit() -> tuple[int, int]:
    """Raises this process's soft limit of open files to its hard limit, and returns (soft, hard).

    Every client connection is a file: under the common soft limit of 1024 a few hundred idle
    connections were enough to make accept() fail for everyone. Children inherit the raised limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # some sandboxes refuse; the limit stays what it was
    return soft, hard


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


def format_cpulist(cpus: list[int]) -> str:
    """parse_cpulist's inverse for sorted cores: "0-3,8" for [0, 1, 2, 3, 8] (a host's 128 cores in a log line)."""
    runs: list[list[int]] = []
    for c in cpus:
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def process_argv(proc: "psutil.Process") -> list[str]:  # noqa: F821 - psutil is imported by the caller
    """A process's command line, with a worker forked by the zygote (dd/zygote.py) shown as
    `python -m dd worker`: its own command line is the zygote's, its process name says "dd-worker"
    (its model and index: RUN_DIR/processes.json)."""
    if proc.name() == "dd-worker":
        return [proc.exe(), "-m", "dd", "worker"]
    return proc.cmdline()


def prefetch_files(paths: list[Path]) -> list[Path]:
    """Asks the kernel to read these files into the page cache now, in the background (readahead).

    The supervisor does it for the models' weights at start: the worker reads them only after the
    zygote's imports (seconds), and a first start after a boot or on a fresh volume would then wait for
    the disk too. Nothing is read in this process or kept in its memory (safe before the zygote forks);
    a file that cannot be opened is left to the worker, which says why. Returns the files asked for.
    """
    asked = []
    for path in dict.fromkeys(paths):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            asked.append(path)
        except (OSError, AttributeError):  # not Linux, or a file system without readahead: only slower
            pass
        finally:
            os.close(fd)
    return asked


def lower_priority(nice: int) -> int:
    """Raises this process's nice value to at least ``nice``, in every thread it has (on Linux a nice
    value is a thread's, and threads started later inherit their creator's). Returns the value set.

    Frontends use it so that, when the host's cores are all busy, the worker thread that feeds the GPU
    is scheduled before them. Raising one's own nice value needs no privilege; lowering it would."""
    if nice <= 0:
        return os.getpriority(os.PRIO_PROCESS, 0)
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # not Linux: the process's value
        threads = [0]
    for tid in threads:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
        except (ProcessLookupError, PermissionError):
            continue  # a thread that ended meanwhile
    return os.getpriority(os.PRIO_PROCESS, 0)


_PR_SET_NAME = 15


def name_os_thread(name: str | None = None) -> bool:
    """Gives the calling thread's Python name (or `name`) to the operating system, first 15 bytes, so
    that `top -H`, `ps -L` and per-thread CPU accounting (scripts/bench_frontend_cpu.py --threads) can
    tell a frontend's decode threads from gRPC's and ZeroMQ's, which name theirs (Python before 3.14 does
    not). Meant as a ThreadPoolExecutor initializer. False where the name could not be set (not Linux)."""
    import threading

    text = (name or threading.current_thread().name).encode(errors="replace")[:15]
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, ctypes.c_char_p(text), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
