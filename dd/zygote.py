"""A process that has imported torch and the engines once, and forks workers from there.

A worker spends most of its start importing: on an H200 host, torch 3 s and the fast
engine's modules (torchvision, Triton) another 3.6 s, against 2.9 s to load the model and
capture its graphs (scripts/profile_startup.py). A worker restarted after a crash pays
that again while its GPU idles. The supervisor therefore starts one zygote, which imports
those modules (without touching CUDA: a forked child must initialise CUDA itself, after
its CUDA_VISIBLE_DEVICES is set), and asks it to fork each worker. The child starts with the
imports done. The imports themselves are on the path start -> SERVING: they run without the cyclic GC,
and without torch._dynamo (dd.lazy_dynamo; scripts/bench_imports.py times them).

Beside its imports the zygote may run calls whose results its children should inherit (`beside`,
"module:function"): each in a thread of its own, started before the imports and joined before the first
fork (a fork must not copy a thread half-way). The one used: Triton's key of itself
(dd.kernel_cache.TRITON_SELF_KEY), a hash of its sources and its 0.5 GB library that a worker otherwise
computes at its first kernel (0.4-0.5 s of the load on an H200 host, S19-1); Triton caches it in the process
(functools.lru_cache), so every worker forked after it finds it there. The hash reads files and hashes in
C with the GIL released, so it runs beside torch's import at no cost to it (the zygote's imports: medians
4.45 and 4.9 s with it against 5.05 and 5.0 s without, six warm starts each, S19-3 and S19-6).

Protocol (JSON lines): the supervisor writes {"spawn": id, "argv": [python, "-m", module,
...], "env": {...}, "log": path or null} to the zygote's stdin; the zygote answers
{"spawned": id, "pid": pid} (or {"spawned": id, "error": why}) and, when a child ends,
{"exited": pid, "rc": code} (negative: killed by that signal, as subprocess reports it).
The zygote is the children's parent, so their `--parent-pid` is rewritten to the zygote's
pid (they stop when it goes); the zygote stops with the supervisor (parent-death signal,
and the end of its stdin).

ZygoteProcess is the supervisor's handle on such a child, with the part of
subprocess.Popen's interface the supervisor uses.
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import runpy
import select
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger("dd.zygote")
_proto = None  # the zygote's channel to the supervisor (its original stdout)


def worker_preload(engine_modules: list[str]) -> list[str]:
    """What the zygote imports for these workers: the worker, and each engine's module (which brings
    torch, torchvision and Triton where the engine needs them; the null engine's does not)."""
    return ["dd.worker.server", *dict.fromkeys(engine_modules)]


# -- the zygote process -------------------------------------------------------------------------
def start_beside(calls: list[str]) -> list[threading.Thread]:
    """Runs each "module:function" in a thread of its own. The module is imported here, in the calling
    thread (imports of one module from two threads at once can deadlock on its lock); only the call runs in
    the thread. A call that fails costs nothing but itself: whoever needs its result computes it later."""
    threads = []
    for spec in calls:
        module, _, func = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError) as exc:  # not installed, or another version: done without
            log.debug("zygote: no %s here (%s)", spec, exc)
            continue
        except Exception as exc:  # noqa: BLE001 - a broken install: the preload reports it, if it matters
            log.warning("zygote: cannot import %s (%s: %s)", spec, type(exc).__name__, exc)
            continue

        def call(fn=fn, spec=spec) -> None:  # noqa: ANN001
            t0 = time.monotonic()
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - the children compute it themselves then
                log.warning("zygote: %s failed beside the imports (%s: %s)", spec, type(exc).__name__, exc)
                return
            log.debug("zygote: %s took %.2f s beside the imports", spec, time.monotonic() - t0)

        thread = threading.Thread(target=call, name=f"beside-{func}", daemon=True)
        thread.start()
        threads.append(thread)
    return threads


def serve(preload: list[str], parent_pid: int, beside: list[str] | None = None) -> int:
    global _proto
    from dd.procutil import die_with_parent

    die_with_parent(parent_pid)
    # The protocol keeps the original stdout to itself; whatever a module prints goes to stderr.
    _proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    # The cyclic GC would scan the growing heap of torch's modules over and over while they import (about a
    # tenth of their CPU time on the CI box); after the imports, those objects are frozen (gc.freeze: kept
    # out of every later collection, the zygote's and its children's, as the gc module's documentation advises
    # before fork without exec) so that a worker's collections scan only its own objects.
    gc.disable()
    threads = start_beside(beside or [])
    for name in preload:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:  # not installed (torch for a null-engine server): children do without
            log.debug("zygote: %s is not installed (%s)", name, exc)
        except Exception as exc:  # noqa: BLE001 - a child imports it again itself and reports the error
            log.warning("zygote: cannot preload %s (%s: %s)", name, type(exc).__name__, exc)
    for thread in threads:
        thread.join()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # pragma: no cover - a preloaded module broke the rule
        _write({"fatal": "a preloaded module initialised CUDA; workers cannot be forked from here"})
        return 1
    gc.freeze()
    gc.enable()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the supervisor decides
    _write({"ready": os.getpid()})
    stdin = sys.stdin.buffer
    pending = b""
    while True:
        ready, _, _ = select.select([stdin, wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
        _reap()
        if stdin in ready:
            chunk = os.read(stdin.fileno(), 65536)
            if not chunk:  # the supervisor is gone
                return 0
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                _spawn(json.loads(line), stdin.fileno(), wake_r, wake_w, _proto.fileno())


def _write(msg: dict) -> None:
    _proto.write(json.dumps(msg) + "\n")  # type: ignore[union-attr]
    _proto.flush()  # type: ignore[union-attr]


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _write({"exited": pid, "rc": os.waitstatus_to_exitcode(status)})


def _spawn(req: dict, *close_fds: int) -> None:
    argv = list(req["argv"])
    if "--parent-pid" in argv:  # the child's parent is this process, and it stops when this one does
        argv[argv.index("--parent-pid") + 1] = str(os.getpid())
    gc.freeze()  # what the zygote made since, too (cheap: a list moved, nothing scanned)
    try:
        pid = os.fork()
    except OSError as exc:
        _write({"spawned": req["spawn"], "error": str(exc)})
        return
    if pid:
        _write({"spawned": req["spawn"], "pid": pid})
        return
    code = 1
    try:  # the child: never returns into the zygote's loop
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        for fd in close_fds:
            os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        if req.get("log"):
            out = os.open(req["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.dup2(out, 1)
            os.dup2(out, 2)
        os.environ.clear()
        os.environ.update(req["env"])
        _retitle(argv)
        if argv[1:2] != ["-m"]:
            raise ValueError(f"the zygote runs `python -m module ...` only, not {argv[:3]}")
        sys.argv = [argv[2], *argv[3:]]
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - report it as the child's own failure, never return to the loop
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _retitle(argv: list[str]) -> None:
    """The child's process name (comm: ps -o comm, top) says what it is, not "python": its command
    line stays the zygote's, so dd.procutil.process_argv tells forked workers by this name and the
    supervisor lists every child's pid in RUN_DIR/processes.json."""
    role = argv[3] if len(argv) > 3 else "child"
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(15, f"dd-{role}"[:15].encode(), 0, 0, 0)  # PR_SET_NAME
    except OSError:  # pragma: no cover - not glibc: only the name is lost
        pass


# -- the supervisor's side ---------------------------------------------------------------------
class Zygote:
    """The supervisor's connection to its zygote: spawn children, learn when they end.

    Creating one starts the process and returns at once: the supervisor starts the frontends while the
    zygote imports (the longest step of a start). spawn() waits for the imports first (wait_ready)."""

    def __init__(self, preload: list[str], env: dict[str, str], start_timeout_s: float = 120.0,
                 beside: list[str] | None = None) -> None:
        self.preload = preload
        self.beside = list(beside or [])
        flags = [arg for spec in self.beside for arg in ("--beside", spec)]
        self.proc = subprocess.Popen([sys.executable, "-m", "dd.zygote", "--parent-pid", str(os.getpid()),
                                      *flags, *preload], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._exited: dict[int, int] = {}
        self._spawned: dict[int, dict] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._buf = b""
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._start_until = time.monotonic() + start_timeout_s
        self._ready = False

    def wait_ready(self) -> None:
        """Returns once the zygote has imported its modules; RuntimeError if it did not start."""
        if self._ready:
            return
        while not self._ready and not self._read_until(lambda m: "ready" in m or "fatal" in m, self._start_until):
            if self.proc.poll() is not None or time.monotonic() >= self._start_until:
                raise RuntimeError("the worker zygote did not start")
        self._ready = True

    def alive(self) -> bool:
        return self.proc.poll() is None

    def spawn(self, argv: list[str], env: dict[str, str], log_path: str | None, timeout_s: float = 30.0
              ) -> "ZygoteProcess":
        self.wait_ready()
        with self._lock:
            self._next += 1
            ident = self._next
            self.proc.stdin.write((json.dumps({"spawn": ident, "argv": argv, "env": env, "log": log_path})
                                   + "\n").encode())
            self.proc.stdin.flush()
            until = time.monotonic() + timeout_s
            while ident not in self._spawned:
                if not self.alive() or time.monotonic() >= until:
                    raise RuntimeError("the worker zygote did not answer")
                self._poll_messages(0.05)
            answer = self._spawned.pop(ident)
        if "error" in answer:
            raise OSError(answer["error"])
        return ZygoteProcess(answer["pid"], self)

    def returncode(self, pid: int) -> int | None:
        with self._lock:
            self._poll_messages(0.0)
            if pid in self._exited:
                return self._exited[pid]
            if not self.alive():  # the zygote is gone, and its children with it (parent-death signal)
                return -signal.SIGTERM
            return None

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _read_until(self, want, until: float) -> bool:  # noqa: ANN001
        while time.monotonic() < until:
            for msg in self._poll_messages(0.1):
                if want(msg):
                    if "fatal" in msg:
                        raise RuntimeError(f"worker zygote: {msg['fatal']}")
                    return True
            if self.proc.poll() is not None:
                return False
        return False

    def _poll_messages(self, wait_s: float) -> list[dict]:
        fd = self.proc.stdout.fileno()
        if wait_s > 0:
            select.select([fd], [], [], wait_s)
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            chunk = b""
        self._buf += chunk
        msgs = []
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            msg = json.loads(line)
            msgs.append(msg)
            if "ready" in msg:  # whoever reads it: wait_ready() then returns at once
                self._ready = True
            if "exited" in msg:
                self._exited[msg["exited"]] = msg["rc"]
            elif "spawned" in msg:
                self._spawned[msg["spawned"]] = msg
        return msgs


class ZygoteProcess:
    """A child of the zygote, with the part of subprocess.Popen's interface the supervisor uses."""

    def __init__(self, pid: int, zygote: Zygote) -> None:
        self.pid = pid
        self._zygote = zygote
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._zygote.returncode(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        until = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if until is not None and time.monotonic() >= until:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
            time.sleep(0.02)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["--parent-pid"] or len(args) < 2:
        print("usage: python -m dd.zygote --parent-pid PID [--beside MODULE:FUNCTION ...] [MODULE ...]",
              file=sys.stderr)
        return 2
    parent, rest, beside = int(args[1]), args[2:], []
    while rest[:1] == ["--beside"] and len(rest) >= 2:
        beside.append(rest[1])
        rest = rest[2:]
    logging.basicConfig(level=logging.WARNING, format="zygote: %(message)s")
    return serve(rest, parent, beside)


if __name__ == "__main__":
    sys.exit(main())

