"""What the benchmark scripts share: request kinds, a served process, its CPU by role, the client load.

Not a test helper and not part of the package: imported by scripts/bench_serve.py,
bench_startup.py and bench_mixed_sizes.py (the scripts folder is on sys.path when one
of them runs). Each request kind is how a client may send one RGB-D frame:

- ``jpeg+png``:  JPEG color + 16-bit PNG depth (the standard request; the server decodes both);
- ``raw``:       raw uint8 RGB + raw uint16 depth (no decoding; 4.6 MB at 1280x720);
- ``jpeg+zstd``: JPEG color + raw uint16 depth compressed with Zstandard (Image.Encoding ZSTD).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dd.proto.deep_detection.v1 import detector_pb2 as pb  # noqa: E402
from dd.synth.scenes import generate_scene  # noqa: E402

# jpeg+png-lib: JPEG and PNG as the client library writes them (dd.client.encoding: a restart marker at
# each MCU row of the JPEG, the PNG's rows flushed every eighth), which a frontend decodes in parts on
# several cores at once (dd/frontend/jpeg_strips.py, png_depth.inflate_parts_into); JPEG quality as jpeg+png's.
KINDS = ("jpeg+png", "raw", "jpeg+zstd", "jpeg+png-lib")


# -- requests ------------------------------------------------------------------------------------
def scenes(n: int, height: int, width: int, seed: int = 5000) -> list[tuple[np.ndarray, np.ndarray]]:
    """n synthetic RGB-D frames (uint8 RGB, uint16 depth in mm): the same for every kind."""
    out = []
    for k in range(n):
        s = generate_scene(seed + k, width, height)
        out.append((np.ascontiguousarray(s.color), np.ascontiguousarray(s.depth)))
    return out


def zstd_available() -> bool:
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return False
    return True


def encode_request(kind: str, color: np.ndarray, depth: np.ndarray, request_id: str = "",
                   zstd_level: int = 3) -> pb.DetectRequest:
    """One frame as a DetectRequest of this kind (masks asked for as RLE, threshold from the model)."""
    req = pb.DetectRequest(mask_format=pb.RLE, request_id=request_id)
    if kind == "raw":
        req.color.CopyFrom(pb.Image(data=color.tobytes(), encoding=pb.Image.RAW, shape=list(color.shape),
                                    dtype=pb.UINT8))
        req.depth.CopyFrom(pb.Image(data=depth.tobytes(), encoding=pb.Image.RAW, shape=list(depth.shape),
                                    dtype=pb.UINT16))
        return req
    if kind == "jpeg+png-lib":
        from dd.client.encoding import encode_jpeg, encode_png16

        req.color.CopyFrom(pb.Image(data=encode_jpeg(color, quality=90)))
        req.depth.CopyFrom(pb.Image(data=encode_png16(depth)))
        return req
    ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(color, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    req.color.CopyFrom(pb.Image(data=jpg.tobytes()))
    if kind == "jpeg+png":
        ok, png = cv2.imencode(".png", depth)
        assert ok
        req.depth.CopyFrom(pb.Image(data=png.tobytes()))
    elif kind == "jpeg+zstd":
        import zstandard

        data = zstandard.ZstdCompressor(level=zstd_level).compress(depth.tobytes())
        req.depth.CopyFrom(pb.Image(data=data, encoding=pb.Image.ZSTD, shape=list(depth.shape), dtype=pb.UINT16))
    else:
        raise ValueError(f"unknown request kind {kind!r}; choose from {', '.join(KINDS)}")
    return req


def requests_of(kind: str, frames: list[tuple[np.ndarray, np.ndarray]], zstd_level: int = 3) -> list[bytes]:
    """Serialized requests (bytes travel to client processes cheaply and parse the same everywhere)."""
    return [encode_request(kind, c, d, str(k), zstd_level).SerializeToString() for k, (c, d) in enumerate(frames)]


def _decode_image(img: pb.Image, flags: int) -> np.ndarray:
    dtypes = {pb.UINT8: np.uint8, pb.UINT16: np.uint16, pb.FLOAT32: np.float32}
    if img.encoding == pb.Image.RAW:
        return np.frombuffer(img.data, dtypes[img.dtype]).reshape(tuple(img.shape))
    if img.encoding == pb.Image.ZSTD:
        import zstandard

        shape, dtype = tuple(img.shape), np.dtype(dtypes[img.dtype])
        raw = zstandard.ZstdDecompressor().decompress(img.data, max_output_size=int(np.prod(shape)) * dtype.itemsize)
        return np.frombuffer(raw, dtype).reshape(shape)
    return cv2.imdecode(np.frombuffer(img.data, np.uint8), flags)


def decode_request(req: pb.DetectRequest) -> tuple[np.ndarray, np.ndarray]:
    """What a plain server (and the in-process script) does with a request: RGB uint8, depth as sent."""
    color = _decode_image(req.color, cv2.IMREAD_COLOR)
    if req.color.encoding == pb.Image.ENCODED:
        color = cv2.cvtColor(color, cv2.COLOR_BGR2RGB)
    return color, _decode_image(req.depth, cv2.IMREAD_UNCHANGED)


def decode_per_core(requests: list[bytes], seconds: float = 2.0) -> float:
    """Images per second one core decodes (this script's decode, cv2 on one thread)."""
    cv2.setNumThreads(1)
    reqs = [pb.DetectRequest.FromString(r) for r in requests]
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        decode_request(reqs[n % len(reqs)])
        n += 1
    return n / (time.perf_counter() - start)


def slot_mb(height: int, width: int) -> int:
    """A ring slot that holds a decoded RGB-D frame of this size (RGB uint8 + float32 depth), with room."""
    return max(8, int(height * width * 7 * 1.25 / 2**20) + 1)


def stop_on_sigterm() -> None:
    """SIGTERM (`timeout`, a stopped job) unwinds like Ctrl-C, so that every server this script started is
    stopped by its `finally` and none is left holding the GPU for the next script."""
    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


# -- statistics -----------------------------------------------------------------------------------
def stats(lat_ms: list[float], wall_s: float, keep: bool = True) -> dict:
    if not lat_ms:
        return {"n": 0}
    out = {"p50_ms": float(np.percentile(lat_ms, 50)), "p99_ms": float(np.percentile(lat_ms, 99)),
           "max_ms": float(np.max(lat_ms)), "images_per_s": len(lat_ms) / wall_s, "n": len(lat_ms)}
    if keep:  # for the latency pictures
        out["latencies_ms"] = [round(x, 3) for x in lat_ms]
    return out


# -- a served process -------------------------------------------------------------------------------
def env_with_repo(root: Path) -> dict[str, str]:
    """This environment with `root`'s dd first on PYTHONPATH, the rest of PYTHONPATH kept (packages
    installed with --target, as on the GPU machine, stay importable by the server)."""
    rest = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(root).resolve())] + ([rest] if rest else [])))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health_status(target: str, timeout: float = 1.0) -> int | None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status
        except grpc.RpcError:
            return None


def wait_health(target: str, timeout: float = 300, proc: subprocess.Popen | None = None, poll_s: float = 0.5,
                log_path: Path | None = None) -> float:
    """Waits until grpc.health says SERVING; returns time.perf_counter() then. Raises with the log's tail
    when the server exits or does not serve in time."""
    from grpc_health.v1 import health_pb2

    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before serving{_tail(log_path)}")
        if health_status(target) == health_pb2.HealthCheckResponse.SERVING:
            return time.perf_counter()
        time.sleep(poll_s)
    raise TimeoutError(f"{target} not serving after {timeout} s{_tail(log_path)}")


def _tail(log_path: Path | None) -> str:
    if log_path is None or not log_path.exists():
        return ""
    return ":\n" + "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])


@dataclass
class Served:
    """`deep-detection serve FOLDER` on a free loopback port, its output in log_path."""

    folder: Path
    run_dir: Path
    log_path: Path
    frontends: int
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    slot_mb: int = 8
    ring_slots: int = 64
    extra_args: list[str] = field(default_factory=list)  # more flags for `serve` (--jpeg-decode worker)
    cwd: Path = REPO  # the source tree `python -m dd` runs from (another checkout: its dd comes first)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    started_at: float = 0.0  # perf_counter at Popen
    started_wall: float = 0.0  # time.time() at Popen (log lines carry wall-clock times)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Served":
        self._log = open(self.log_path, "ab")
        argv = [sys.executable, "-m", "dd", "serve", str(self.folder), "--host", "127.0.0.1", "--port",
                str(self.port), "--run-dir", str(self.run_dir), "--slot-mb", str(self.slot_mb),
                "--ring-slots", str(self.ring_slots),
                "--metrics-port", str(free_port())]  # metrics on, as deployed, on a port of its own
        if self.frontends:
            argv += ["--frontends", str(self.frontends)]
        argv += self.extra_args
        self.started_wall = time.time()
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)
        return self

    def wait_serving(self, timeout: float = 300, poll_s: float = 0.5) -> float:
        """Seconds from start to SERVING."""
        return wait_health(self.target, timeout, self.proc, poll_s, self.log_path) - self.started_at

    def stop(self, timeout: float = 60) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pids(self, role: str) -> list[int]:
        """Process ids of this server's children of one role ("worker", "frontend")."""
        import psutil

        out = []
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if _role_of(child) == role:
                    out.append(child.pid)
            except psutil.NoSuchProcess:
                continue
        return out


def _role_of(proc) -> str:
    """frontend, worker (also one forked by the zygote), zygote, ... from `python -m dd ROLE`."""
    from dd.procutil import process_argv

    argv = process_argv(proc)
    return argv[3] if len(argv) > 3 and argv[1:3] == ["-m", "dd"] else "other"


def thread_times(proc) -> dict[int, tuple[str, float]]:
    """CPU seconds so far of each of a process's threads, by thread id, with the operating system's name
    for it (frontends name their decode threads and workers their inference thread,
    dd.procutil.name_os_thread; gRPC, ZeroMQ and CUDA name theirs; a thread inherits its creator's name,
    so torch's CPU threads carry "inference"), digits at the end dropped so that a pool's threads add up,
    and "main thread" for the main one. Also, under the negative thread id, the seconds the thread was
    ready to run but waited for a core (the kernel's schedstat run delay), named "NAME (waiting for a
    core)": a thread that waits long there is short of cores, not of work. Linux only ({} elsewhere)."""
    import psutil

    out: dict[int, tuple[str, float]] = {}
    try:
        threads = proc.threads()
    except (psutil.Error, OSError):
        return out
    for t in threads:
        try:
            name = Path(f"/proc/{proc.pid}/task/{t.id}/comm").read_text().strip()
        except OSError:
            continue
        name = "main thread" if t.id == proc.pid else re.sub(r"[_/-]?\d+$", "", name) or name
        out[t.id] = (name, t.user_time + t.system_time)
        try:
            waited_ns = int(Path(f"/proc/{proc.pid}/task/{t.id}/schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):  # no schedstats in this kernel
            continue
        out[-t.id] = (f"{name} (waiting for a core)", waited_ns / 1e9)
    return out


def thread_cpu(proc) -> dict[str, float]:
    """thread_times summed by name (CPU only)."""
    out: dict[str, float] = {}
    for tid, (name, cpu) in thread_times(proc).items():
        if tid > 0:
            out[name] = out.get(name, 0.0) + cpu
    return out


def threads_by_role(server_pid: int) -> dict[int, tuple[str, float]]:
    """thread_times of a server's frontends and workers, the names prefixed "frontend: " or "worker: "."""
    import psutil

    out: dict[int, tuple[str, float]] = {}
    try:
        children = psutil.Process(server_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for child in children:
        try:
            role = _role_of(child)
        except psutil.NoSuchProcess:
            continue
        if role in ("frontend", "worker"):
            out.update({tid: (f"{role}: {name}", cpu) for tid, (name, cpu) in thread_times(child).items()})
    return out


def thread_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds between two threads_by_role snapshots by name, and for a name that several threads
    share, its busiest thread's as "NAME (busiest)": one thread that stays near a whole core is a limit
    that a sum over its pool hides."""
    total: dict[str, float] = {}
    busiest: dict[str, float] = {}
    count: dict[str, int] = {}
    for tid, (name, cpu) in after.items():
        d = cpu - before.get(tid, (name, 0.0))[1]
        total[name] = total.get(name, 0.0) + d
        busiest[name] = max(busiest.get(name, 0.0), d)
        count[name] = count.get(name, 0) + 1
    out = dict(total)
    out.update({f"{name} (busiest)": busiest[name] for name, k in count.items() if k > 1})
    return out


def cpu_by_role(server_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of a server's processes by role (frontend, worker, supervisor;
    "server" for a single-process server) and of this benchmark's client (this process and its other
    children: the client processes). Each frontend also apart, as "frontend#PID" (cpu_delta keeps the
    busiest and the idlest: the kernel gives each client connection to one frontend)."""
    import psutil

    out: dict[str, float] = {}

    def add(role: str, pid: int | psutil.Process) -> None:
        try:
            proc = pid if isinstance(pid, psutil.Process) else psutil.Process(pid)
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            return
        out[role] = out.get(role, 0.0) + t.user + t.system

    server = psutil.Process(server_pid)
    children = server.children(recursive=True)
    add("supervisor" if children else "server", server)
    for child in children:
        try:
            role = _role_of(child)
        except psutil.NoSuchProcess:
            continue
        add(role, child)
        if role == "frontend":
            add(f"frontend#{child.pid}", child)
    me = psutil.Process()
    add("client", me)
    for child in me.children(recursive=True):
        if child.pid != server_pid and child not in children:
            add("client", child)
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float], answered: int, wall_s: float,
              threads_before: dict[int, tuple[str, float]] | None = None,
              threads_after: dict[int, tuple[str, float]] | None = None) -> dict:
    """CPU ms per answered image by role (and by thread, given threads_by_role before and after), and
    cores busy meanwhile (warm-up requests counted: upper bounds)."""
    n = max(1, answered)
    spent = {k: after[k] - before.get(k, 0.0) for k in after if "#" not in k}
    out: dict = {"cpu_ms_per_image": {k: round(v * 1e3 / n, 2) for k, v in spent.items()},
                 "cores_busy": {k: round(v / max(wall_s, 1e-9), 2) for k, v in spent.items()}}
    each = sorted(after[k] - before.get(k, 0.0) for k in after if k.startswith("frontend#"))
    if each:  # how evenly the kernel spread the clients' connections over the frontends
        out["frontend_processes"] = {"busiest_ms_per_image": round(each[-1] * 1e3 / n, 2),
                                     "idlest_ms_per_image": round(each[0] * 1e3 / n, 2),
                                     "cores_each": [round(v / max(wall_s, 1e-9), 2) for v in each]}
    if threads_after:
        out["thread_cpu_ms_per_image"] = {k: round(v * 1e3 / n, 2) for k, v in
                                          sorted(thread_delta(threads_before or {}, threads_after).items())}
    return out


# -- server logs ----------------------------------------------------------------------------------
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) \[([^\]]*)\] (.*)$")
PHASES = {  # what a log line says about start-up -> a name for its numbers
    "engine_load": re.compile(r"fast engine loaded in ([\d.]+) s: weights and model ([\d.]+) s, fusing and "
                              r"kernels ([\d.]+) s, warm-up and graph captures ([\d.]+) s"),
    "worker_loaded": re.compile(r"worker (\S+) loaded (\S+) engine in ([\d.]+) s"),
    "capture_at_load": re.compile(r"captured the network for (.+?) in ([\d.]+) s \(warm-up runs ([\d.]+) s\)"),
    "capture_while_serving": re.compile(r"captured the network for (.+?) (?:in the background in|in) ([\d.]+) s"
                                        r"(?:;| while serving)"),
    "capture_failed": re.compile(r"cannot capture the network for (.+?) in the background"),
    "restart": re.compile(r"(\S+) \(pid (\d+)\) exited with (.+?) after ([\d.]+) s; restarting in ([\d.]+) s"),
    "started": re.compile(r"started (\S+) \(pid (\d+)[,)]"),
    "serving": re.compile(r"serving (.+?) on (\S+) with (\d+) worker\(s\) and (\d+) frontend\(s\)"),
    "zygote_started": re.compile(r"started the worker zygote \(pid (\d+)\)"),
    "zygote_ready": re.compile(r"worker zygote ready: imports took ([\d.]+) s"),
    "worker_listening": re.compile(r"worker (\S+) listening on "),
    "found_worker": re.compile(r"found worker (\S+) at "),  # a frontend found its socket
    "ready_at_frontend": re.compile(r"^worker (\S+) ready$"),  # a frontend heard it (health follows)
    "compressed_warmup": re.compile(r"warmed up compressed inputs \(a JPEG on the GPU: (\w+); "
                                    r"PNG depth rows: (\w+)\) in ([\d.]+) s"),
    "rings_prepared": re.compile(r"worker (\S+) prepared (\d+) frontend ring\(s\) for its engine in ([\d.]+) s"),
}


def log_events(text: str, since_wall: float = 0.0) -> list[dict]:
    """The log's lines that say something about start-up, captures or restarts, in order: each with its
    kind, its numbers (as parsed) and its time in seconds after since_wall (when the line has a stamp)."""
    events = []
    for line in text.splitlines():
        m = _STAMP.match(line)
        message, at = (m.group(4), datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()) if m \
            else (line, None)
        for kind, rx in PHASES.items():
            hit = rx.search(message)
            if hit:
                events.append({"kind": kind, "groups": list(hit.groups()), "message": message[:300],
                               "at_s": None if at is None else round(at - since_wall, 3)})
                break
    return events


# -- the client load ---------------------------------------------------------------------------------
async def load_raw(target: str, requests: list[bytes], concurrency: int, seconds: float,
                   start_at: float | None = None, warmup: int = 4,
                   connections: int | None = None, trace_every: int = 0) -> tuple[list[float], list[dict], dict, float]:
    """Closed-loop load: latencies (ms), the servers' timing fields, errors by status, and the wall time.
    `connections`: the client's (None: the client library's default). `trace_every` k > 0: every k-th
    request is traced (Result.trace, in its timing dict under "trace") and left out of the latencies and
    timings, so that the trace's own cost (a JSON object in the trailing metadata) is in no percentile."""
    from dd.client import AsyncDetectorClient

    reqs = [pb.DetectRequest.FromString(r) for r in requests]
    lat: list[float] = []
    timings: list[dict] = []
    traces: list[dict] = []
    errors: dict[str, int] = {}
    async with AsyncDetectorClient(target, timeout=60, **({} if connections is None else
                                                          {"connections": connections})) as client:
        for r in reqs[:warmup]:
            await client.detect_request(r)
        if start_at is not None:  # several client processes start loading together
            await asyncio.sleep(max(0.0, start_at - time.time()))
        stop_at = time.perf_counter() + seconds

        async def worker(w: int) -> None:
            k = w
            n = 0
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                n += 1
                traced = trace_every > 0 and n % trace_every == 0
                try:
                    res = await client.detect_request(reqs[k % len(reqs)], trace=traced)
                    if traced:
                        traces.append(res.trace)
                    else:
                        lat.append((time.perf_counter() - t0) * 1e3)
                        timings.append(res.timing)
                except Exception as exc:  # noqa: BLE001 - counted, reported
                    name = exc.code().name if hasattr(exc, "code") else type(exc).__name__
                    errors[name] = errors.get(name, 0) + 1
                    await asyncio.sleep(0.01)  # no busy loop against a server that refuses at once
                k += concurrency

        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - start
    if traces:  # rides along with the timings, which every caller passes on to summarize
        timings.append({"traces": traces})
    return lat, timings, errors, wall


# A traced request's hops in order (dd.client.api.Result.trace): each step is from one to the next.
TRACE_HOPS = ("client_sent", "handler", "received", "decoded", "dispatched", "accepted", "batch_started",
              "replied", "arrived", "returned", "client_received")


def hop_medians(traces: list[dict]) -> dict[str, float]:
    """Median ms of each step between consecutive hops ("a>b"), over traces that have them all."""
    whole = [t for t in traces if t and all(t.get(h, 0) > 0 for h in TRACE_HOPS)]
    return {f"{a}>{b}": float(np.median([(t[b] - t[a]) * 1e3 for t in whole]))
            for a, b in zip(TRACE_HOPS, TRACE_HOPS[1:])} if whole else {}


def summarize(lat: list[float], timings: list[dict], errors: dict, wall: float) -> dict:
    traces = [t for entry in timings if "traces" in entry for t in entry["traces"]]
    timings = [entry for entry in timings if "traces" not in entry]
    out = stats(lat, wall)
    out["errors"] = sum(errors.values())
    out["errors_by_code"] = errors
    if traces:
        out["traced"] = len(traces)
        out["hops_ms"] = hop_medians(traces)
    if timings and "total_us" in timings[0]:
        for key in ("queued_us", "decode_us", "inference_us", "postprocess_us", "total_us", "batch_size"):
            out[f"median_{key}"] = float(np.median([t[key] for t in timings]))
    return out


def _load_in_child(target: str, requests: list[bytes], concurrency: int, seconds: float, start_at: float,
                   connections: int | None = None, trace_every: int = 0):
    return asyncio.run(load_raw(target, requests, concurrency, seconds, start_at, connections=connections,
                                trace_every=trace_every))


def _ready(_: int) -> int:
    import grpc  # noqa: F401 - the first load pays no imports

    import dd.client  # noqa: F401

    return os.getpid()


class ClientPool:
    """Client processes kept for the whole run, so that one asyncio loop is not what saturates first
    (it tops out at a few hundred requests/s), and no load waits for processes to start."""

    def __init__(self, procs: int) -> None:
        self.procs = max(1, procs)
        self.pool = None
        if self.procs > 1:
            import multiprocessing
            from concurrent import futures

            self.pool = futures.ProcessPoolExecutor(self.procs, mp_context=multiprocessing.get_context("spawn"))
            list(self.pool.map(_ready, range(self.procs * 4)))

    def load(self, target: str, requests: list[bytes], concurrency: int, seconds: float,
             connections: int | None = None, trace_every: int = 0) -> dict:
        """`connections`: each client process's (None: the client library's default). `trace_every`:
        see load_raw."""
        procs = min(self.procs, concurrency)
        if procs == 1 or self.pool is None:
            return summarize(*asyncio.run(load_raw(target, requests, concurrency, seconds, connections=connections,
                                                   trace_every=trace_every)))
        shares = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
        start_at = time.time() + 1.0  # each (already started) process connects and warms up first
        parts = list(self.pool.map(_load_in_child, [target] * procs, [requests] * procs, shares,
                                   [seconds] * procs, [start_at] * procs, [connections] * procs,
                                   [trace_every] * procs))
        errors: dict[str, int] = {}
        for p in parts:
            for k, v in p[2].items():
                errors[k] = errors.get(k, 0) + v
        return summarize([x for p in parts for x in p[0]], [x for p in parts for x in p[1]], errors,
                         max(p[3] for p in parts))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def probe(target: str, request: bytes) -> str | None:
    """None if the server answers this request, else why not (its status and message)."""
    from dd.client import DetectorClient

    with DetectorClient(target, timeout=60) as client:
        try:
            client.detect_request(pb.DetectRequest.FromString(request))
        except Exception as exc:  # noqa: BLE001 - reported
            return str(exc)
    return None
