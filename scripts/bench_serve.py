#!/usr/bin/env python3
"""Serving benchmark: the same engine in-process, served by deep-detection, and by a plain gRPC server.

One run, one table. Requests are 1280x720 RGB-D frames as JPEG + 16-bit PNG
(synthetic scenes), the model a Mask R-CNN (R50-FPN by default, fixed random
weights, threshold 0 so each image keeps its maximum detections) on the
engine you name (fast on a GPU, torchvision otherwise).

- in-process: decode the same bytes, run the engine, encode and serialize the
  response (with its masks, as the served client asks for them) in one process,
  as a script would (batch 1 for latency, the max batch for throughput);
- served: `deep-detection serve` on this machine, an asyncio gRPC client at
  concurrency 1 and at saturation;
- baseline: a single-process grpc server whose handler decodes and infers
  (the usual way such a service is written), same client load.

Also prints the frontend's decode cost per core, to show whether decoding
limits throughput. Needs a GPU for meaningful numbers; runs anywhere.

    python scripts/bench_serve.py --engine fast --json $OUT/serve.json
    python scripts/bench_serve.py --engine fast --scale-workers 1 2 4 8   # multi-GPU scaling
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dd.config import DEFAULT_ARCHITECTURE, load_model_config  # noqa: E402
from dd.synth.scenes import generate_scene  # noqa: E402


def make_model(root: Path, engine: str, arch: str, batch: int, height: int, width: int, dets: int,
               min_size: int, placement: dict | None = None, name: str = "bench") -> Path:
    from dd.models.model_folder import SMALL_ARCHITECTURE, random_model_folder  # torch: not in client processes

    architecture = dict(DEFAULT_ARCHITECTURE if arch == "r50" else SMALL_ARCHITECTURE, max_detections=dets)
    return random_model_folder(root / name, input_kind="rgbd", seed=0, architecture=architecture,
                               min_size=min_size, max_size=1333, score_threshold=0.0,
                               extra={"ENGINE": engine, "MAX_BATCH_SIZE": batch, "MAX_QUEUE_DELAY_MS": 0,
                                      # options are checked against the engine named: only the fast engine has these
                                      "ENGINE_OPTIONS": ({"warmup_sizes": [[height, width]], "allow_cpu": True}
                                                         if engine == "fast" else {}),
                                      **(placement or {})})


def serve_and_load(folder: Path, run_dir: Path, log_path: Path, frontends: int, env: dict[str, str],
                   frames: list[tuple[bytes, bytes]], concurrencies: list[int], seconds: float,
                   client_procs: int = 1) -> dict:
    """`deep-detection serve FOLDER` on a free port, loaded at each concurrency in turn, then stopped."""
    port = free_port()
    log = open(log_path, "wb")
    serve = subprocess.Popen([sys.executable, "-m", "dd", "serve", str(folder), "--host", "127.0.0.1",
                              "--port", str(port), "--frontends", str(frontends), "--run-dir", str(run_dir),
                              "--slot-mb", "8", "--ring-slots", "64"], stdout=log, stderr=subprocess.STDOUT,
                             env=env, cwd=REPO)
    out = {}
    try:
        wait_health(f"127.0.0.1:{port}")
        for c in concurrencies:
            before = cpu_by_role(serve.pid)
            out[c] = load_from_processes(f"127.0.0.1:{port}", frames, c, seconds, client_procs)
            after = cpu_by_role(serve.pid)
            # CPU seconds each role spent per answered image, and cores busy while loaded (the
            # clients' start-up and warm-up requests are counted too: upper bounds).
            n = max(1, out[c].get("n", 0))
            wall = n / out[c]["images_per_s"] if out[c].get("images_per_s") else 1.0
            out[c]["cpu_ms_per_image"] = {k: round((after[k] - before.get(k, 0.0)) * 1e3 / n, 2) for k in after}
            out[c]["cores_busy"] = {k: round((after[k] - before.get(k, 0.0)) / wall, 2) for k in after}
            print(f"served {folder.name} c={c}:", out[c], flush=True)
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
        log.close()
    return out


def cpu_by_role(server_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of the server's processes by role (frontend, worker, the
    supervisor) and of this benchmark's client (this process and its client processes)."""
    import psutil

    out: dict[str, float] = {}

    def add(role: str, proc: psutil.Process) -> None:
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            return
        out[role] = out.get(role, 0.0) + t.user + t.system

    server = psutil.Process(server_pid)
    add("supervisor", server)
    for child in server.children(recursive=True):
        try:
            argv = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        role = argv[3] if len(argv) > 3 and argv[1:3] == ["-m", "dd"] else "other"
        add(role, child)
    add("client", psutil.Process())
    # client processes have ended (and been waited for) by the time a load returns
    ended = resource.getrusage(resource.RUSAGE_CHILDREN)
    out["client"] += ended.ru_utime + ended.ru_stime
    return out


def gpu_count() -> int:
    root = Path("/proc/driver/nvidia/gpus")
    return len(list(root.iterdir())) if root.is_dir() else 0


def scaling(args: argparse.Namespace, tmp: Path, frames: list[tuple[bytes, bytes]]) -> list[dict]:
    """Throughput and latency with 1, 2, 4, 8 workers (one per GPU where there are that many GPUs),
    each loaded at the same rising concurrency per worker, so that rows compare like with like.

    Where there are fewer GPUs than workers (a CPU smoke test, or one GPU) the workers share
    the devices (INSTANCES_PER_DEVICE), which measures the serving path, not GPU scaling.
    """
    gpus = gpu_count()
    rows = []
    for n in args.scale_workers:
        if gpus >= n:
            placement = {"DEVICES": list(range(n)), "INSTANCES_PER_DEVICE": 1}
            where = f"{n} GPU(s), one worker each"
        else:
            placement = {"DEVICES": "auto", "INSTANCES_PER_DEVICE": n}
            where = f"{n} workers sharing {'the CPU' if gpus == 0 else f'{gpus} GPU(s)'}"
        folder = make_model(tmp, args.engine, args.arch, args.batch, args.height, args.width, args.detections,
                            args.min_size, placement, name=f"scale{n}")
        concs = [c * n for c in args.per_worker_concurrency]
        served = serve_and_load(folder, tmp / f"run{n}", tmp / f"serve{n}.log", args.frontends, dict(os.environ),
                                frames, concs, args.seconds, args.client_procs)
        for per, conc in zip(args.per_worker_concurrency, concs):
            rows.append({"workers": n, "where": where, "per_worker": per, "concurrency": conc, **served[conc]})
    return rows


def scaling_table(rows: list[dict]) -> list[str]:
    """Markdown rows: each against the one-worker row at the same concurrency per worker."""
    single = {r["per_worker"]: r for r in rows if r["workers"] == 1 and r.get("n")}
    lines = ["| workers | placement | concurrency (per worker) | images/s | / (N x one worker's) | p50 ms | p99 ms "
             "| p99 / one worker's | errors |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.get("n"):
            lines.append(f"| {r['workers']} | {r['where']} | {r['concurrency']} ({r['per_worker']}) | no answers "
                         f"| | | | | {r.get('errors', '')} |")
            continue
        one = single.get(r["per_worker"])
        eff = r["images_per_s"] / (r["workers"] * one["images_per_s"]) if one else float("nan")
        p99 = r["p99_ms"] / one["p99_ms"] if one else float("nan")
        lines.append(f"| {r['workers']} | {r['where']} | {r['concurrency']} ({r['per_worker']}) | "
                     f"{r['images_per_s']:.1f} | {eff:.2f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {p99:.2f} | "
                     f"{r['errors']} |")
    return lines


def encode_frames(n: int, height: int, width: int) -> list[tuple[bytes, bytes]]:
    frames = []
    for k in range(n):
        s = generate_scene(5000 + k, width, height)
        ok1, jpg = cv2.imencode(".jpg", cv2.cvtColor(s.color, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        ok2, png = cv2.imencode(".png", s.depth)
        assert ok1 and ok2
        frames.append((jpg.tobytes(), png.tobytes()))
    return frames


def decode(jpg: bytes, png: bytes) -> tuple[np.ndarray, np.ndarray]:
    color = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    depth = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    return color, depth


def stats(lat_ms: list[float], wall_s: float) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(lat_ms, 50)), "p99_ms": float(np.percentile(lat_ms, 99)),
            "images_per_s": len(lat_ms) / wall_s, "n": len(lat_ms)}


# -- in-process -------------------------------------------------------------------------------
def run_in_process(folder: Path, device: str, frames: list[tuple[bytes, bytes]], batch: int, seconds: float) -> dict:
    import torch

    from dd.worker.core import WorkerCore, WorkItem
    from dd.worker.engines import load_engine

    cfg = load_model_config(folder)
    engine = load_engine(cfg, device)
    core = WorkerCore(cfg, engine, "in-process")  # what a worker runs: engine, then the detector_v1 encoder
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    sizes: list[int] = []

    def once(k: int, n: int) -> None:
        items = [WorkItem(*decode(*frames[(k + i) % len(frames)])) for i in range(n)]
        for outcome in core.run(items):
            if outcome.code != "OK":
                raise RuntimeError(f"in-process: {outcome.code}: {outcome.message}")
            sizes.append(len(outcome.body))
        sync()

    out = {}
    for n in sorted({1, batch}):
        for k in range(3):
            once(k, n)
        lat, start, k = [], time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            once(k, n)
            lat.append((time.perf_counter() - t0) * 1e3)
            k += n
        wall = time.perf_counter() - start
        s = stats(lat, wall)
        s["images_per_s"] = n * len(lat) / wall
        out[f"batch{n}"] = s
    out["response_bytes"] = int(np.median(sizes))
    engine.close()
    return out


# -- a plain single-process gRPC server (the baseline) -----------------------------------------------
def baseline_server(folder: Path, device: str, port: int) -> None:
    import grpc

    from dd.proto.deep_detection.v1 import detector_pb2 as pb
    from dd.worker.core import WorkerCore, WorkItem
    from dd.worker.engines import load_engine

    cfg = load_model_config(folder)
    core = WorkerCore(cfg, load_engine(cfg, device), "baseline")
    lock = threading.Lock()

    def detect(request, context) -> bytes:
        color, depth = decode(request.color.data, request.depth.data)
        with lock:
            outcome = core.run([WorkItem(color, depth, mask_format=request.mask_format,
                                         request_id=request.request_id)])[0]
        if outcome.code != "OK":
            context.abort(getattr(grpc.StatusCode, outcome.code, grpc.StatusCode.INTERNAL), outcome.message)
        return outcome.body  # already serialized by the worker core's encoder, as a worker's reply is

    # Detect only (the load below calls nothing else), answering with the encoder's bytes as they are.
    handler = grpc.unary_unary_rpc_method_handler(detect, request_deserializer=pb.DetectRequest.FromString,
                                                  response_serializer=lambda body: body)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("deep_detection.v1.Detector",
                                                                          {"Detect": handler})])
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("baseline ready", flush=True)
    server.wait_for_termination()


# -- the client load -------------------------------------------------------------------------------
async def load_raw(target: str, frames: list[tuple[bytes, bytes]], concurrency: int, seconds: float,
                   start_at: float | None = None) -> tuple[list[float], list[dict], int, float]:
    """Closed-loop load: latencies (ms), the servers' timing fields, errors, and the wall time."""
    from dd.client import AsyncDetectorClient, make_request

    reqs = [make_request(j, p, request_id=str(k)) for k, (j, p) in enumerate(frames)]
    lat: list[float] = []
    timings: list[dict] = []
    errors = 0
    async with AsyncDetectorClient(target, timeout=60) as client:
        for r in reqs[:4]:
            await client.detect_request(r)  # warm-up
        if start_at is not None:  # several client processes start loading together
            await asyncio.sleep(max(0.0, start_at - time.time()))
        stop_at = time.perf_counter() + seconds

        async def worker(w: int) -> None:
            nonlocal errors
            k = w
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    res = await client.detect_request(reqs[k % len(reqs)])
                    lat.append((time.perf_counter() - t0) * 1e3)
                    timings.append(res.timing)
                except Exception:  # noqa: BLE001 - counted, reported
                    errors += 1
                k += concurrency

        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - start
    return lat, timings, errors, wall


def summarize(lat: list[float], timings: list[dict], errors: int, wall: float) -> dict:
    out = stats(lat, wall) if lat else {"n": 0}
    out["errors"] = errors
    if timings and "total_us" in timings[0]:
        for key in ("queued_us", "decode_us", "inference_us", "postprocess_us", "total_us", "batch_size"):
            out[f"median_{key}"] = float(np.median([t[key] for t in timings]))
    return out


async def load(target: str, frames: list[tuple[bytes, bytes]], concurrency: int, seconds: float) -> dict:
    return summarize(*(await load_raw(target, frames, concurrency, seconds)))


def _load_in_child(target: str, frames: list[tuple[bytes, bytes]], concurrency: int, seconds: float,
                   start_at: float):
    return asyncio.run(load_raw(target, frames, concurrency, seconds, start_at))


def load_from_processes(target: str, frames: list[tuple[bytes, bytes]], concurrency: int, seconds: float,
                        procs: int) -> dict:
    """The same load split over several client processes, so that one Python client is not what
    saturates first when many GPUs serve (one asyncio loop tops out at a few hundred requests/s)."""
    procs = max(1, min(procs, concurrency))
    if procs == 1:
        return asyncio.run(load(target, frames, concurrency, seconds))
    import multiprocessing

    shares = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    with futures.ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
        start_at = time.time() + 20.0  # after every process has started and warmed up
        parts = list(pool.map(_load_in_child, [target] * procs, [frames] * procs, shares, [seconds] * procs,
                              [start_at] * procs))
    lat = [x for p in parts for x in p[0]]
    timings = [x for p in parts for x in p[1]]
    return summarize(lat, timings, sum(p[2] for p in parts), max(p[3] for p in parts))


def wait_health(target: str, timeout: float = 300) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    end = time.time() + timeout
    while time.time() < end:
        with grpc.insecure_channel(target) as ch:
            try:
                st = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if st == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.5)
    raise TimeoutError(f"{target} not serving after {timeout} s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _grpc_floor(request: bytes, response: bytes, seconds: float) -> float:
    import grpc

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])

    async def echo(_req: bytes, _ctx: grpc.aio.ServicerContext) -> bytes:
        return response

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "floor.Floor", {"Call": grpc.unary_unary_rpc_method_handler(echo)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    lat: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                         options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        call = ch.unary_unary("/floor.Floor/Call")
        for _ in range(10):
            await call(request)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            await call(request)
            lat.append((time.perf_counter() - t0) * 1e3)
    await server.stop(None)
    return float(np.median(lat))


def grpc_floor(frames: list[tuple[bytes, bytes]], response_bytes: int, seconds: float = 3.0) -> float:
    """p50 ms of a bare grpc.aio call carrying one of these requests and a response of the served
    size, client and server in this process: what any Python gRPC service pays on this machine
    before doing anything, and the in-process script does not."""
    from dd.client import make_request

    request = make_request(*frames[0]).SerializeToString()
    return asyncio.run(_grpc_floor(request, b"\0" * response_bytes, seconds))


def decode_per_core(frames: list[tuple[bytes, bytes]], seconds: float = 3.0) -> float:
    """Frontend decode (JPEG color + PNG depth into a slot) on one core: images per second."""
    from dd.frontend.decode import decode_into_slot
    from dd.frontend.protocols.detector_v1 import image_inputs
    from dd.proto.deep_detection.v1 import detector_pb2 as pb

    cv2.setNumThreads(1)
    reqs = [pb.DetectRequest(color=pb.Image(data=j), depth=pb.Image(data=p)) for j, p in frames]
    slot = memoryview(bytearray(16 << 20))
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        decode_into_slot(*image_inputs(reqs[n % len(reqs)]), True, slot, 1 << 24)
        n += 1
    return n / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", default="fast", help="fast (GPU) or torchvision")
    ap.add_argument("--arch", default="r50", choices=["r50", "small"])
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--batch", type=int, default=8, help="MAX_BATCH_SIZE, and the in-process throughput batch")
    ap.add_argument("--detections", type=int, default=100)
    ap.add_argument("--min-size", type=int, default=800, help="the model's shorter side")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--frontends", type=int, default=4, help="0: the server's default (from the cores)")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--scale-workers", type=int, nargs="+",
                    help="instead of the comparison, serve with each number of workers (e.g. 1 2 4 8; one per GPU "
                         "where there are enough GPUs) and print throughput and latency side by side")
    ap.add_argument("--per-worker-concurrency", type=int, nargs="+", default=[1, 4, 16],
                    help="with --scale-workers: concurrency per worker, each run for every worker count")
    ap.add_argument("--client-procs", type=int, default=1,
                    help="client processes that share the load (use several for many GPUs)")
    ap.add_argument("--json")
    ap.add_argument("--baseline-server", nargs=3, metavar=("FOLDER", "DEVICE", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_server:
        baseline_server(Path(args.baseline_server[0]), args.baseline_server[1], int(args.baseline_server[2]))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="ddbench-", dir="/tmp"))
    folder = make_model(tmp, args.engine, args.arch, args.batch, args.height, args.width, args.detections,
                        args.min_size)
    frames = encode_frames(16, args.height, args.width)
    kb = np.mean([len(j) + len(p) for j, p in frames]) / 1024
    print(f"requests: {args.width}x{args.height} RGB-D, JPEG+PNG {kb:.0f} KiB each; model {args.arch} "
          f"engine {args.engine} on {args.device}", flush=True)
    results: dict = {"decode_images_per_s_per_core": decode_per_core(frames)}
    print(f"frontend decode: {results['decode_images_per_s_per_core']:.0f} images/s per core", flush=True)

    results["in_process"] = run_in_process(folder, args.device, frames, args.batch, args.seconds)
    print("in-process:", results["in_process"], flush=True)
    results["grpc_floor_ms"] = grpc_floor(frames, results["in_process"]["response_bytes"])
    print(f"a bare grpc.aio call with this request and a {results['in_process']['response_bytes']} byte response: "
          f"p50 {results['grpc_floor_ms']:.2f} ms", flush=True)

    if args.scale_workers:
        rows = scaling(args, tmp, frames)
        ref = results["in_process"][f"batch{args.batch}"]["images_per_s"]
        print(f"\n## Scaling, {args.width}x{args.height} RGB-D JPEG+PNG, {args.arch} {args.engine}, "
              f"{args.frontends or 'auto'} frontends, {args.client_procs} client processes; in-process "
              f"reference {ref:.1f} images/s on one device\n")
        print("\n".join(scaling_table(rows)), flush=True)
        results["scaling"] = rows
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))
        return 0

    # deep-detection serve
    gpu = args.device.split(":")[1] if args.device.startswith("cuda") else ""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu) if gpu else dict(os.environ)
    results["served"] = serve_and_load(folder, tmp / "run", tmp / "serve.log", args.frontends, env, frames,
                                       args.concurrency, args.seconds, args.client_procs)

    # the plain single-process server
    port = free_port()
    base = subprocess.Popen([sys.executable, __file__, "--baseline-server", str(folder), args.device, str(port)],
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "baseline.log", "wb"), cwd=REPO)
    try:
        end = time.time() + 300
        import grpc

        while time.time() < end:
            try:
                with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                    grpc.channel_ready_future(ch).result(timeout=1)
                break
            except grpc.FutureTimeoutError:
                time.sleep(0.5)
        results["baseline"] = {}
        for c in args.concurrency:
            results["baseline"][c] = load_from_processes(f"127.0.0.1:{port}", frames, c, args.seconds,
                                                         args.client_procs)
            print(f"baseline c={c}:", results["baseline"][c], flush=True)
    finally:
        base.send_signal(signal.SIGTERM)
        base.wait(30)

    ip1 = results["in_process"]["batch1"]
    ipb = results["in_process"][f"batch{args.batch}"]
    c1, cs = args.concurrency[0], args.concurrency[-1]
    print(f"\n## Serving, {args.width}x{args.height} RGB-D JPEG+PNG, {args.arch} {args.engine}, device {args.device}\n")
    print("| path | concurrency | p50 ms | p99 ms | images/s |")
    print("|---|---|---|---|---|")
    print(f"| in-process, batch 1 | 1 | {ip1['p50_ms']:.1f} | {ip1['p99_ms']:.1f} | {ip1['images_per_s']:.1f} |")
    print(f"| in-process, batch {args.batch} | - | {ipb['p50_ms']:.1f} (batch) | {ipb['p99_ms']:.1f} | "
          f"{ipb['images_per_s']:.1f} |")
    for name in ("served", "baseline"):
        for c in args.concurrency:
            r = results[name][c]
            if r.get("n"):
                print(f"| {name} | {c} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['images_per_s']:.1f} |"
                      + (f" errors {r['errors']}" if r["errors"] else ""))
    s1, ss = results["served"][c1], results["served"][cs]
    print(f"\nserved p50 at concurrency {c1} minus in-process batch-1 p50: {s1['p50_ms'] - ip1['p50_ms']:+.2f} ms "
          f"(a bare gRPC call of this size: {results['grpc_floor_ms']:.2f} ms)")
    print(f"served throughput at concurrency {cs} / in-process batch {args.batch}: "
          f"{ss['images_per_s'] / ipb['images_per_s']:.3f}")
    b = results["baseline"][cs]
    if b.get("n"):
        print(f"served / baseline throughput at concurrency {cs}: {ss['images_per_s'] / b['images_per_s']:.2f}")
    med = {k: v for k, v in ss.items() if k.startswith("median_")}
    print(f"served at saturation, median server-side timing (us): {med}")
    print(f"served at saturation, CPU ms per image by role: {ss.get('cpu_ms_per_image')}; cores busy: "
          f"{ss.get('cores_busy')} of {os.cpu_count()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
