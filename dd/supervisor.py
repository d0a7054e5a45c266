"""`deep-detection serve`: starts the workers and the frontends, keeps them alive, stops them cleanly.

The supervisor holds no request state. It plans one worker per engine instance
(by default one per GPU, each pinned to the cores near its GPU; on a machine
without GPUs one CPU worker per model), starts them, then the frontends,
restarts any that die (with backoff), and on SIGTERM/SIGINT stops the
frontends first (they finish what is in flight), then the workers, and
removes the shared memory and sockets of the run. A second SIGTERM/SIGINT
stops at once (SIGKILL to the children).

A worker whose model cannot be loaded (wrong format, wrong shapes) stays up
to tell the frontends why and is not restarted (it would fail the same way);
the supervisor reports it in one line, from the file the worker writes in the
run directory. The other models serve. When no model can be loaded at all,
`serve` stops and exits with status 3 (LoadFailed), that line its message.

It also serves the Prometheus endpoint (--metrics-port, dd/metrics.py): the children count into
files under RUN_DIR/metrics, which it adds up at each scrape; it counts worker restarts itself.

Its children die with it: each asks Linux for SIGTERM when its parent dies
(PR_SET_PDEATHSIG) and also watches its parent pid, so a SIGKILLed supervisor
leaves no worker holding a GPU; the next start removes what they left behind.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dd.config import ConfigError, ModelConfig, ServerConfig
from dd.config.engines import spec_for
from dd.ipc import endpoints
from dd.ipc.client_segments import remove_registrations
from dd.ipc.shm_ring import SHM_DIR, check_shm_capacity, remove_stale_segments, ring_size
from dd.kernel_cache import TRITON_SELF_KEY, manifest_applies, marker
from dd.listen_address import free_port, listen_problem
from dd import metrics
from dd.procutil import EXIT_CONFIG, LOG_NAME_ENV, parse_cpulist, prefetch_files
from dd.zygote import Zygote, ZygoteProcess, worker_preload

log = logging.getLogger("dd.supervisor")

RESTART_BACKOFF_S = (0.2, 1.0, 2.0, 5.0, 10.0, 30.0)
# A process that ran this long was not crash-looping at start: its next restart is immediate again.
# (At 60 s, a worker killed every half minute, say by the OOM killer, stayed down for 30 s at a time.)
STABLE_AFTER_S = 10.0
# Stopping: the frontends get --grace plus this to finish what they have in flight and exit, then
# the workers get WORKER_STOP_S; whatever is still running then is killed.
FRONTEND_STOP_EXTRA_S = 5.0
WORKER_STOP_S = 15.0


def longest_clean_stop_s(cfg: ServerConfig) -> float:
    """The longest a stop on SIGTERM can take before the supervisor kills what is left.

    A process manager must wait longer than this before it kills the supervisor: systemd's
    TimeoutStopSec, Kubernetes' terminationGracePeriodSeconds (docs/operations.md, deploy/).
    """
    return cfg.grace_s + FRONTEND_STOP_EXTRA_S + WORKER_STOP_S


def kernel_preload_gpu(models: list[ModelConfig], plans: list[WorkerPlan]) -> int | None:
    """The GPU the fast engine's Triton kernels are compiled ahead on: the first fast-engine worker's; None
    where no fast-engine worker has a GPU (nothing to compile for)."""
    fast = {m.name for m in models if m.engine == "fast"}
    return next((p.gpu for p in plans if p.gpu is not None and p.model in fast), None)


def zygote_beside(models: list[ModelConfig], plans: list[WorkerPlan]) -> list[str]:
    """What the zygote computes beside its imports for its workers (dd.zygote, `beside`): Triton's key of
    itself where a fast-engine worker has a GPU, whose first kernel would otherwise compute it."""
    return [TRITON_SELF_KEY] if kernel_preload_gpu(models, plans) is not None else []


def gpu_model(index: int) -> str:
    """The model of the GPU CUDA numbers `index` in PCI bus order ("NVIDIA H200"), from the driver's
    /proc files (no CUDA here); "" where they do not say."""
    root = Path("/proc/driver/nvidia/gpus")
    try:
        bus = sorted(p.name for p in root.iterdir())[index]
        for line in (root / bus / "information").read_text().splitlines():
            if line.startswith("Model:"):
                return line.partition(":")[2].strip()
    except (OSError, IndexError):
        pass
    return ""


def visible_gpus() -> list[dict[str, str]]:
    """GPUs on this host, in PCI bus order, without initialising CUDA in the supervisor.

    Each entry has the index CUDA will use (CUDA_DEVICE_ORDER=PCI_BUS_ID is set
    for workers) and the bus id, from which the NUMA-local cores are read.
    """
    root = Path("/proc/driver/nvidia/gpus")
    if not root.is_dir():
        return []
    bus_ids = sorted(p.name for p in root.iterdir())
    gpus = [{"index": str(i), "bus_id": b} for i, b in enumerate(bus_ids)]
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        wanted = [v.strip() for v in env.split(",") if v.strip()]
        gpus = [g for g in gpus if g["index"] in wanted]
    return gpus


def local_cpus(bus_id: str) -> list[int]:
    """The cores on the GPU's NUMA node (from sysfs), or every core if unknown."""
    path = Path("/sys/bus/pci/devices") / bus_id.lower() / "local_cpulist"
    try:
        return parse_cpulist(path.read_text().strip())
    except OSError:
        return sorted(os.sched_getaffinity(0))


@dataclass
class Child:
    """One supervised process and how to start it again."""

    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | ZygoteProcess | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    model: str = ""  # workers only
    failure_file: Path | None = None  # workers only: written when its model cannot be loaded
    load_failure: str = ""  # what that file said, once read


PROCESS_TABLE = "processes.json"  # in the run directory: every child's name and pid


class LoadFailed(RuntimeError):
    """No model could be loaded; the message says which file and what is wrong, one line per model."""


@dataclass
class WorkerPlan:
    model: str
    index: int
    gpu: int | None
    cpus: list[int]


def plan_workers(models: list[ModelConfig], gpus: list[dict[str, str]]) -> list[WorkerPlan]:
    plans: list[WorkerPlan] = []
    all_cpus = sorted(os.sched_getaffinity(0))
    for m in models:
        if m.devices == ("cpu",) or (m.devices == ("auto",) and not gpus):
            devices: list[int | None] = [None]
        elif m.devices == ("auto",):
            devices = [int(g["index"]) for g in gpus]
        else:
            known = {g["index"] for g in gpus}
            missing = [d for d in m.devices if d not in known]
            if missing:
                raise ConfigError(f"{m.config_path}: key 'DEVICES': GPU(s) {missing} not present; "
                                  f"this host has {sorted(known) or 'no GPUs'}")
            devices = [int(d) for d in m.devices]
        for dev in devices:
            for _ in range(m.instances_per_device):
                plans.append(WorkerPlan(m.name, len([p for p in plans if p.model == m.name]), dev, []))
    # Cores: a GPU worker gets the cores near its GPU, shared with the other workers there;
    # CPU workers split the cores between them so they do not fight over threads.
    cpu_plans = [p for p in plans if p.gpu is None]
    for k, p in enumerate(cpu_plans):
        share = max(1, len(all_cpus) // max(1, len(cpu_plans)))
        p.cpus = all_cpus[k * share:(k + 1) * share] or all_cpus
    by_index = {int(g["index"]): g for g in gpus}
    for p in plans:
        if p.gpu is not None:
            p.cpus = local_cpus(by_index[p.gpu]["bus_id"]) if p.gpu in by_index else all_cpus
    return plans


class Supervisor:
    def __init__(self, models_path: Path, models: list[ModelConfig], server: ServerConfig) -> None:
        self.models_path = models_path
        self.models = models
        self.cfg = server
        self.run_dir = server.resolved_run_dir()
        self.children: list[Child] = []
        self._stop = False
        self._force = False
        self._lock_fd: int | None = None
        self._fatal = ""
        self._config_problem = ""  # a frontend exited with EXIT_CONFIG: stop, and say this
        self._zygote: Zygote | None = None
        self._preload: subprocess.Popen | None = None  # compiling Triton kernels ahead (_start_kernel_preload)
        self._zygote_started = 0.0
        self._zygote_waited = False
        self._metrics_dir: Path | None = None  # PROMETHEUS_MULTIPROC_DIR of this run, when metrics are on
        self._metrics_server = None
        self._recorder: metrics.Recorder | None = None

    def _base_argv(self, role: str) -> list[str]:
        cfg = asdict(self.cfg)
        cfg["run_dir"] = str(self.run_dir)
        return [sys.executable, "-m", "dd", role, str(self.models_path), "--server-json", json.dumps(cfg),
                "--parent-pid", str(os.getpid())]

    def _prepare(self) -> None:
        endpoints.prepare_run_dir(self.run_dir)
        self.run_dir = self.run_dir.resolve()
        self._lock_fd = os.open(self.run_dir / "supervisor.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another deep-detection server is running with run directory {self.run_dir} "
                              f"(port {self.cfg.port}); stop it or choose another --port/--run-dir") from None
        # What a crashed run left behind: its sockets and shared memory.
        tag = endpoints.run_tag(self.run_dir)
        removed = remove_stale_segments(tag, only_dead=False)
        remove_registrations(self.run_dir)  # a crashed run's client shared-memory registrations
        for _, _, path in endpoints.list_worker_sockets(self.run_dir):
            path.unlink(missing_ok=True)
        endpoints.remove_reply_sockets(self.run_dir, only_dead=False)
        for path in self.run_dir.glob(f"*{endpoints.LOAD_FAILURE_SUFFIX}*"):
            path.unlink(missing_ok=True)
        if removed:
            log.warning("removed %d stale shared-memory segment(s) of a previous run: %s", len(removed), removed)
        n_frontends = self.cfg.resolved_frontends()
        try:
            check_shm_capacity(n_frontends * ring_size(self.cfg.ring_slots, self.cfg.slot_bytes()))
        except Exception:
            self._release_run_dir()
            raise
        self._check_ports()
        warning = open_port_warning(self.cfg)
        if warning:
            log.warning("%s", warning)

    def _child(self, name: str, argv: list[str], env_extra: dict[str, str]) -> Child:
        env = dict(os.environ)
        env.update(env_extra)
        env[LOG_NAME_ENV] = name  # one log file per process under --log-dir: NAME.log
        return Child(name, argv, env)

    def _spawn(self, child: Child) -> None:
        stderr = None
        if self.cfg.log_dir:
            Path(self.cfg.log_dir).mkdir(parents=True, exist_ok=True)
            # Opened anew for each start: the child may have rotated the file the last one wrote to.
            stderr = open(Path(self.cfg.log_dir) / f"{child.name}.log", "ab")
        if child.failure_file is not None:
            child.failure_file.unlink(missing_ok=True)
            child.load_failure = ""
        if child.failure_file is not None and self._zygote is not None:
            self._zygote_ready()
        try:
            if child.failure_file is not None and self._zygote is not None and self._zygote.alive():
                child.proc = self._zygote.spawn(child.argv, child.env, stderr.name if stderr else None)
            else:
                child.proc = subprocess.Popen(child.argv, env=child.env, stdin=subprocess.DEVNULL, stderr=stderr,
                                              stdout=stderr)
        finally:
            if stderr is not None:
                stderr.close()  # the child has its own copy
        child.started_at = time.monotonic()
        self._write_process_table()
        log.info("started %s (pid %d%s)", child.name, child.proc.pid,
                 ", forked with its imports done" if isinstance(child.proc, ZygoteProcess) else "")

    def _write_process_table(self) -> None:
        """RUN_DIR/processes.json: each child's name and pid (null while it is down), for operators and
        tools: a forked worker's command line is the zygote's, so ps cannot tell them apart."""
        table = {"supervisor": os.getpid(), "zygote": self._zygote.proc.pid if self._zygote else None,
                 "children": {c.name: c.proc.pid if c.proc is not None else None for c in self.children}}
        tmp = self.run_dir / "processes.json.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(table, f)
            os.replace(tmp, self.run_dir / PROCESS_TABLE)
        except OSError as exc:
            log.debug("cannot write the process table: %s", exc)

    def _start_zygote(self, plans: list[WorkerPlan]) -> None:
        """Workers are forked from a process that has imported torch and their engines, so that a worker
        restarted after a crash skips its imports (about 7 s of a 10 s start on an H200 host).

        Started before anything else, and not waited for here: its imports are the longest step of a
        start, and the frontends start meanwhile. The first worker's spawn waits for it (_zygote_ready)."""
        modules = []
        for m in self.models:
            spec = spec_for(m.engine)
            if spec is not None and ":" in spec.target:
                modules.append(spec.target.partition(":")[0])
        beside = zygote_beside(self.models, plans)
        try:
            self._zygote = Zygote(worker_preload(modules), dict(os.environ), beside=beside)
        except Exception as exc:  # noqa: BLE001 - workers start the usual way, only slower
            log.warning("cannot start the worker zygote (%s); workers start as new processes", exc)
            self._zygote = None
            return
        self._zygote_started = time.monotonic()
        log.info("started the worker zygote (pid %d), importing %s%s", self._zygote.proc.pid,
                 ", ".join(self._zygote.preload), "".join(f"; {b} beside" for b in beside))

    def _start_kernel_preload(self, plans: list[WorkerPlan]) -> None:
        """Compiles the fast engine's Triton kernels into Triton's cache, in processes of their own, while the
        zygote imports (dd/worker/engines/kernels/preload.py): with an empty cache the workers' loads then
        find most of them compiled. Not waited for; a kernel not there yet is compiled by the load itself.
        On the GPU of the first fast-engine worker, whose architecture the kernels are compiled for."""
        gpu = kernel_preload_gpu(self.models, plans)
        if not self.cfg.preload_kernels or gpu is None or not manifest_applies():
            return
        model = gpu_model(gpu)
        if marker(model).exists():  # compiled by an earlier start on this machine
            return
        env = {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": str(gpu)}
        try:  # a session of its own: stopped with its pool at shutdown (_stop_kernel_preload)
            self._preload = subprocess.Popen([sys.executable, "-m", "dd.worker.engines.kernels.preload",
                                              "--parent-pid", str(os.getpid()), "--gpu", model], env=env,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            log.warning("cannot start compiling the Triton kernels ahead (%s); the workers compile them", exc)

    def _stop_kernel_preload(self) -> None:
        if self._preload is None:
            return
        if self._preload.poll() is None:
            try:
                os.killpg(self._preload.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self._preload.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(self._preload.pid, signal.SIGKILL)
            self._preload.wait()
        self._preload = None

    def _zygote_ready(self) -> None:
        """Waits for the zygote's imports (once); without a zygote, workers start as new processes."""
        if self._zygote is None or self._zygote_waited:
            return
        self._zygote_waited = True
        try:
            self._zygote.wait_ready()
        except Exception as exc:  # noqa: BLE001 - workers start the usual way, only slower
            log.warning("cannot start the worker zygote (%s); workers start as new processes", exc)
            self._zygote.close()
            self._zygote = None
            return
        log.info("worker zygote ready: imports took %.1f s", time.monotonic() - self._zygote_started)

    def run(self) -> int:
        plans = plan_workers(self.models, visible_gpus())  # may refuse DEVICES: before anything is created
        # Resolved once, here, so that every child (workers size their queues by it) sees the same count;
        # a count from the cores is lowered to what /dev/shm holds (a count given is checked as given).
        if self.cfg.frontends <= 0:
            want = self.cfg.resolved_frontends(len(plans))
            ring = ring_size(self.cfg.ring_slots, self.cfg.slot_bytes())
            try:
                fits = max(1, int(shutil.disk_usage(SHM_DIR).free // ring))
            except OSError:
                fits = want
            if fits < want:
                log.warning("%d frontends would suit this machine's cores, but %s holds the rings of %d; "
                            "serving with %d (give it more room, or lower --slot-mb / --ring-slots)",
                            want, SHM_DIR, fits, fits)
            self.cfg.frontends = min(want, fits)
        self._choose_port()
        self._prepare()
        self._start_metrics(plans)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for p in plans:
            argv = self._base_argv("worker") + ["--model", p.model, "--index", str(p.index),
                                                "--gpu", str(p.gpu if p.gpu is not None else -1)]
            if p.cpus:
                argv += ["--cpus", ",".join(map(str, p.cpus))]
            child = self._child(f"worker-{p.model}.{p.index}", argv, {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
            child.model = p.model
            child.failure_file = endpoints.load_failure_file(self.run_dir, p.model, p.index)
            self.children.append(child)
        for i in range(self.cfg.resolved_frontends()):
            self.children.append(self._child(f"frontend-{i}", self._base_argv("frontend"), {}))
        # The weights into the page cache while the zygote imports (the workers read them after it).
        prefetch_files([m.weights for m in self.models if m.weights is not None])
        # The zygote first, then the frontends while it imports, then the workers (forked once it is ready).
        if plans and self.cfg.fork_workers:
            self._start_zygote(plans)
        self._start_kernel_preload(plans)
        for c in sorted(self.children, key=lambda c: c.failure_file is not None):
            self._spawn(c)
        log.info("serving %s on %s with %d worker(s) and %d frontend(s); run directory %s",
                 ", ".join(m.name for m in self.models), self.cfg.listen_address(), len(plans),
                 self.cfg.resolved_frontends(), self.run_dir)
        try:
            while not self._stop:
                self._watch()
                self._check_loads()
                time.sleep(0.1)
        finally:
            self._shutdown()
        if self._config_problem:
            raise ConfigError(self._config_problem)
        if self._fatal:
            raise LoadFailed(self._fatal)
        return 0

    def _choose_port(self) -> None:
        """`--port 0`: one port the kernel chooses now, for every frontend (each asking for port 0 would
        listen on a port of its own), and the run directory named for it."""
        if self.cfg.port or self.cfg.unix_socket():
            return
        try:
            self.cfg.port = free_port(self.cfg.host)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.cfg.host} (--port 0): {exc.strerror or exc}; "
                              "check --host") from None
        if not self.cfg.run_dir:
            self.run_dir = self.cfg.resolved_run_dir()
        log.info("--port 0: listening on port %d, which the kernel chose", self.cfg.port)

    def _listen_problem(self, shared: bool) -> str | None:
        problems = (listen_problem(self.cfg.host, port, flag, shared=shared) for flag, port in self.cfg.listen_ports())
        return next((p for p in problems if p), None)

    def _check_ports(self) -> None:
        """Before any frontend starts, the gRPC ports must be free: taken by anyone, another deep-detection
        server of this user included (which the frontends would otherwise share them with), it is an error."""
        problem = self._listen_problem(shared=False)
        if problem:
            self._release_run_dir()
            raise ConfigError(problem)

    def _start_metrics(self, plans: list[WorkerPlan]) -> None:
        """The Prometheus endpoint (--metrics-port), before any child starts: the children inherit
        PROMETHEUS_MULTIPROC_DIR and write their counts there; the endpoint adds them up at each scrape.
        With metrics off the variable is removed, so that no child records into a directory of the caller's."""
        if not self.cfg.metrics_port:
            os.environ.pop(metrics.MULTIPROC_ENV, None)
            return
        self._metrics_dir = metrics.prepare_multiproc_dir(self.run_dir / "metrics")
        host = "127.0.0.1" if self.cfg.host.startswith("unix:") else self.cfg.host.strip("[]")
        gpus = sorted({p.gpu for p in plans if p.gpu is not None})  # the GPUs this server uses
        try:
            self._metrics_server = metrics.start_metrics_server(
                self.cfg.metrics_port, self._metrics_dir, host=host, gpus=gpus,
                certfile=self.cfg.tls_cert or None, keyfile=self.cfg.tls_key or None)
        except OSError as exc:
            metrics.remove_multiproc_dir(self._metrics_dir)
            self._release_run_dir()
            raise ConfigError(f"cannot serve metrics on {host}:{self.cfg.metrics_port} ({exc.strerror or exc}); "
                              "choose another --metrics-port (metrics_port), or 0 for no metrics") from None
        self._recorder = metrics.Recorder()
        log.info("metrics on %s://%s:%d/metrics", "https" if self.cfg.tls_cert else "http", host,
                 self._metrics_server.server_port)

    def _on_signal(self, signum: int, frame: object) -> None:
        if not self._stop:
            log.info("%s received: stopping (finishing requests in flight for up to %.0f s; "
                     "send it again to stop at once)", signal.Signals(signum).name, self.cfg.grace_s)
        elif not self._force:
            log.warning("%s received again: stopping at once", signal.Signals(signum).name)
            self._force = True
        self._stop = True

    def _watch(self) -> None:
        now = time.monotonic()
        for c in self.children:
            if c.proc is None:
                if now >= c.restart_at:
                    self._spawn(c)
                    if c.failure_file is not None and self._recorder is not None:  # a worker, after it died
                        self._recorder.worker_restarted(c.model)
                continue
            rc = c.proc.poll()
            if rc is None:
                continue
            ran = now - c.started_at
            if rc == EXIT_CONFIG and c.failure_file is None:  # a frontend that cannot listen, or cannot start
                self._config_problem = (self._listen_problem(shared=True) or
                                        f"{c.name} (pid {c.proc.pid}) stopped on a configuration error; "
                                        "its log above says which")
                log.error("%s; stopping", self._config_problem)
                self._stop = True
                c.proc = None
                return
            c.failures = 1 if ran > STABLE_AFTER_S else c.failures + 1
            delay = RESTART_BACKOFF_S[min(c.failures, len(RESTART_BACKOFF_S)) - 1]
            log.warning("%s (pid %d) exited with %s after %.1f s; restarting in %.1f s",
                        c.name, c.proc.pid, _describe_exit(rc), ran, delay)
            if self._metrics_dir is not None:
                metrics.process_exited(c.proc.pid, self._metrics_dir)  # its ring gauges stop counting
            c.proc = None
            c.restart_at = now + delay
            self._write_process_table()

    def _check_loads(self) -> None:
        """Reports each worker whose model cannot be loaded, once; stops when no model can be served."""
        workers = [c for c in self.children if c.failure_file is not None]
        news = []
        for c in workers:
            if c.load_failure or c.proc is None or not c.failure_file.exists():
                continue
            try:
                c.load_failure = c.failure_file.read_text().strip() or "unknown reason"
            except OSError:
                continue
            news.append(c)
        if not news:
            return
        by_model = {m.name: [c for c in workers if c.model == m.name] for m in self.models}
        failed = {name: ws for name, ws in by_model.items() if ws and all(c.load_failure for c in ws)}
        if len(failed) == len(self.models):
            self._fatal = "; ".join(f"model {name!r} ({self._config_path(name)}) cannot be loaded: "
                                    f"{ws[0].load_failure}" for name, ws in failed.items())
            self._stop = True
            return
        for model in dict.fromkeys(c.model for c in news):
            ws = by_model.get(model, [])
            if model in failed:
                log.error("model %r (%s) cannot be loaded: %s. The other models serve; ListModels shows why and "
                          "its requests get UNAVAILABLE. Not restarting its worker(s) (pid %s): they would fail "
                          "the same way. Fix the files, then restart the server (or stop those pids to retry)",
                          model, self._config_path(model), ws[0].load_failure,
                          ", ".join(str(c.proc.pid) for c in ws if c.proc))
            else:
                for c in (c for c in news if c.model == model):
                    log.error("%s (pid %d) cannot load model %r (%s): %s. The model's other workers serve; not "
                              "restarting this one", c.name, c.proc.pid, model, self._config_path(model),
                              c.load_failure)

    def _config_path(self, model: str) -> Path | str:
        return next((m.config_path for m in self.models if m.name == model), model)

    def _stop_group(self, children: list[Child], timeout: float) -> None:
        for c in children:
            if c.proc is not None and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGKILL if self._force else signal.SIGTERM)
        end = time.monotonic() + timeout
        running = [c for c in children if c.proc is not None]
        while running:
            running = [c for c in running if c.proc.poll() is None]
            if self._force or time.monotonic() >= end:
                for c in running:
                    if not self._force:
                        log.warning("%s did not stop in time; killing it", c.name)
                    c.proc.kill()
                    c.proc.wait()
                break
            time.sleep(0.02)

    def _shutdown(self) -> None:
        frontends = [c for c in self.children if c.name.startswith("frontend")]
        workers = [c for c in self.children if c.name.startswith("worker")]
        self._stop_group(frontends, self.cfg.grace_s + FRONTEND_STOP_EXTRA_S)
        self._stop_group(workers, WORKER_STOP_S)
        if self._zygote is not None:
            self._zygote.close()
        self._stop_kernel_preload()
        tag = endpoints.run_tag(self.run_dir)
        remove_stale_segments(tag, only_dead=False)
        remove_registrations(self.run_dir)  # client shared memory: every registration goes with the run
        for _, _, path in endpoints.list_worker_sockets(self.run_dir):
            path.unlink(missing_ok=True)
        endpoints.remove_reply_sockets(self.run_dir, only_dead=False)
        for path in self.run_dir.glob(f"*{endpoints.LOAD_FAILURE_SUFFIX}*"):
            path.unlink(missing_ok=True)
        (self.run_dir / PROCESS_TABLE).unlink(missing_ok=True)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if self._metrics_dir is not None:
            metrics.remove_multiproc_dir(self._metrics_dir)
        self._release_run_dir()
        log.info("stopped")

    def _release_run_dir(self) -> None:
        (self.run_dir / "supervisor.lock").unlink(missing_ok=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        try:
            self.run_dir.rmdir()
        except OSError:
            pass  # not empty: something else lives there; leave it


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1", "[::1]") or host.startswith("127.") or host.startswith("unix:")


WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")


def open_port_warning(cfg: ServerConfig) -> str | None:
    """The warning for a port that anyone who can reach it may use (no TLS, no token), or None.

    A wildcard host is bound dual-stack by gRPC ("0.0.0.0" included): the port is then open on every
    IPv4 and every IPv6 address of the host, which the warning says, as IPv6 is easily forgotten in
    a firewall that was written for IPv4.
    """
    if cfg.tls_cert or cfg.auth_token_file or _loopback(cfg.host):
        return None
    where = (f"port {cfg.port} of every IPv4 and IPv6 address of this host (host {cfg.host or '0.0.0.0'!r} binds "
             "both: gRPC listens dual-stack)" if cfg.host in WILDCARD_HOSTS else f"{cfg.host}:{cfg.port}")
    return (f"serving on {where} with no TLS and no token: anyone who can reach it can use it "
            "(see docs/operations.md: --host 127.0.0.1, --tls-cert/--tls-key, --auth-token-file)")


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"code {rc}"
