#!/usr/bin/env python3
"""CPU per request of the server's own processes, by request kind, with the null engine.

A real `deep-detection serve` (one frontend, one null-engine RGB-D worker on the CPU) gets N requests
one at a time of each kind; the CPU seconds (user + system, psutil) of its frontend and worker
processes before and after give the cost per request. The decode column is what decode_into_slot
costs for the same request in this process (process CPU time, both decode threads), so
`frontend - decode` is what request handling costs: gRPC, protobuf, asyncio, the ring, the
dispatcher. Kinds are the client's encodings (dd.client.encoding) of 1280x720 dd.synth frames:
raw (4.6 MB), jpeg+png (the standard request, ~1 MB), jpeg+zstd.

    python scripts/bench_frontend_cpu.py [--requests 200 --kinds raw jpeg+png jpeg+zstd] [--png-rows]

--png-rows serves the null engine with ENGINE_OPTIONS png_rows: it says it reconstructs 16-bit PNG
depth rows, as the fast engine on a GPU does, so the frontend sends a PNG depth as its inflated rows
(dd/frontend/png_depth.py) instead of decoding it; the worker then reconstructs them with numpy (on a
GPU that is device work). Run with and without it to see the frontend's share of the standard request.

--floor also serves each kind's requests from a bare grpc.aio server in a process of its own
(scripts/bench_grpc_transport.py's: a client stream of one message, parsed as a DetectRequest, answered
with a response of the size the frontend sent back; glibc's allocator set as the frontend sets it) and
reads that process's CPU per call: what any Python gRPC server pays for the same messages, against the
frontend's "rest".
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_requests import _role_of, cpu_by_role, env_with_repo, free_port, thread_cpu, wait_health  # noqa: E402

from dd.synth.scenes import generate_scene  # noqa: E402


def null_model(folder: Path, instances: int, png_rows: bool = False) -> Path:
    folder.mkdir(parents=True)
    (folder / "categories.txt").write_text("carton\n")
    options = {"instances": instances, **({"png_rows": True} if png_rows else {})}
    (folder / "node_config.json").write_text(json.dumps({
        "DETECTION_TYPE": "RGBDNullServicer", "CATEGORY_FILE": "categories.txt", "SCORE_THRESH_TEST": 0.0,
        "MAX_BATCH_SIZE": 1, "DEVICES": "cpu", "ENGINE_OPTIONS": options}))
    return folder


def _py_spy(server_pid: int, out: Path, native: bool) -> subprocess.Popen:
    import psutil

    frontend = next(c.pid for c in psutil.Process(server_pid).children(recursive=True) if _role_of(c) == "frontend")
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen(["py-spy", "record", "-p", str(frontend), "-r", "250", "-f", "raw", "-o", str(out),
                            "--threads", "--idle"] + (["--native"] if native else []),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached
    return spy


def _frontend_threads(server_pid: int) -> dict[str, float]:
    """thread_cpu of the server's frontend (one here)."""
    import psutil

    return thread_cpu(next(c for c in psutil.Process(server_pid).children(recursive=True)
                           if _role_of(c) == "frontend"))


_IDLE_FRAMES = ("epoll_wait", "EpollSelector.select", "PyThread_acquire_lock_timed")


def busy_main_thread(raw: Path, top: int = 25) -> list[str]:
    """The frontend main thread's busy samples of a py-spy raw file (recorded with --idle, which keeps
    every sample; samples waiting in epoll or on a lock are dropped here, since py-spy's own idle test
    counted every thread as busy on the machines tried): each Python frame's inclusive share, highest
    first."""
    frames: dict[str, int] = {}
    busy = total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        parts = stack.split(";")
        if not parts or "MainThread" not in parts[0] or not count.isdigit():
            continue
        total += int(count)
        if any(idle in part for part in parts for idle in _IDLE_FRAMES):
            continue
        busy += int(count)
        for frame in {part for part in parts[1:] if ".py:" in part}:
            frames[frame] = frames.get(frame, 0) + int(count)
    if not busy:
        return [f"no busy main-thread samples in {raw}"]
    ranked = sorted(frames.items(), key=lambda kv: -kv[1])[:top]
    return ([f"main thread: {busy} of {total} samples busy ({busy / total:.0%}); inclusive share of the busy ones:"]
            + [f"  {n / busy:6.1%}  {frame}" for frame, n in ranked])


def _frontend_rss_mib(server_pid: int) -> float:
    import psutil

    return sum(c.memory_info().rss for c in psutil.Process(server_pid).children(recursive=True)
               if _role_of(c) == "frontend") / 2**20


def decode_cpu_ms(request, repeats: int, png_rows: bool = False) -> float:
    from dd.frontend.decode import decode_into_slot
    from dd.frontend.protocols.detector_v1 import image_inputs

    slot = memoryview(bytearray(8 << 20))
    images = image_inputs(request)
    decode_into_slot(*images, True, slot, 1 << 24, png_rows_to_worker=png_rows)
    t0 = time.process_time()
    for _ in range(repeats):
        decode_into_slot(*images, True, slot, 1 << 24, png_rows_to_worker=png_rows)
    return (time.process_time() - t0) / repeats * 1e3


def floor_cpu_ms(requests: list, response_bytes: int, calls: int) -> float:
    """A bare grpc.aio server's CPU ms per call for these DetectRequests and a response of response_bytes
    (bench_grpc_transport.serve with the Detector protobufs), the calls made as the timed ones above."""
    import multiprocessing as mp

    import grpc

    from bench_grpc_transport import BASE, cpu_s, serve
    from dd.proto.deep_detection.v1 import detector_pb2 as pb

    ctx = mp.get_context("spawn")
    port, ready = free_port(), ctx.Event()
    proc = ctx.Process(target=serve, args=(port, {"protobuf": True, "allocator": True}, response_bytes, ready),
                       daemon=True)
    proc.start()
    try:
        if not ready.wait(60):
            raise SystemExit("the bare gRPC server did not start")
        with grpc.insecure_channel(f"127.0.0.1:{port}", BASE) as ch:
            method = ch.unary_unary("/bench.S/M", request_serializer=pb.DetectRequest.SerializeToString,
                                    response_deserializer=pb.DetectResponse.FromString)
            for r in requests * 3:  # warm-up, as for the frontend
                method(r, timeout=30)
            before = cpu_s(proc.pid)
            for i in range(calls):
                method(requests[i % len(requests)], timeout=30)
            return (cpu_s(proc.pid) - before) / calls * 1e3
    finally:
        proc.terminate()
        proc.join(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=200, help="requests per kind, one at a time")
    ap.add_argument("--kinds", nargs="+", default=["raw", "jpeg+png", "jpeg+zstd"])
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--instances", type=int, default=20, help="null-engine instances per image (with RLE masks)")
    ap.add_argument("--frames", type=int, default=4, help="distinct scenes, sent in turn")
    ap.add_argument("--py-spy", metavar="DIR", type=Path,
                    help="record the frontend with py-spy during each kind's requests: DIR/KIND.txt, collapsed "
                         "stacks (pip install py-spy; it adds its own CPU to the numbers)")
    ap.add_argument("--png-rows", action="store_true",
                    help="the null engine takes PNG depths as rows, as the fast engine on a GPU (the docstring)")
    ap.add_argument("--native", action="store_true", help="with --py-spy: C/C++ frames too")
    ap.add_argument("--threads", action="store_true",
                    help="also the frontend's CPU per request by thread (Linux: by the names in /proc)")
    ap.add_argument("--floor", action="store_true",
                    help="also a bare grpc.aio server's CPU per call for the same messages (the docstring)")
    ap.add_argument("--server-repo", metavar="DIR", type=Path, default=REPO,
                    help="serve the `dd` of this checkout (e.g. a `git worktree` of an older commit, for a "
                         "before/after comparison); requests are built by this one")
    args = ap.parse_args()

    import grpc

    from dd.client import make_request
    from dd.proto.deep_detection.v1 import detector_pb2_grpc as pb_grpc

    scenes = [generate_scene(5000 + k, args.width, args.height) for k in range(args.frames)]
    jpegs = [cv2.imencode(".jpg", cv2.cvtColor(s.color, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
             .tobytes() for s in scenes]
    requests = {}
    for kind in args.kinds:
        # Color as the camera's JPEG where the kind sends JPEG (never re-encoded), else the array.
        requests[kind] = [make_request(s.color if kind == "raw" else j, s.depth, encoding=kind, request_id=str(k))
                          for k, (s, j) in enumerate(zip(scenes, jpegs))]

    tmp = Path(tempfile.mkdtemp(prefix="dd-fecpu-"))
    folder = null_model(tmp / "null", args.instances, args.png_rows)
    port = free_port()
    log = open(tmp / "serve.log", "wb")
    serve = subprocess.Popen([sys.executable, "-m", "dd", "serve", str(folder), "--host", "127.0.0.1", "--port",
                              str(port), "--frontends", "1", "--run-dir", str(tmp / "run"), "--slot-mb", "8",
                              "--ring-slots", "16"], stdout=log, stderr=subprocess.STDOUT, cwd=args.server_repo,
                             env=env_with_repo(args.server_repo))
    rows = []
    by_thread: dict[str, dict[str, float]] = {}
    try:
        target = f"127.0.0.1:{port}"
        wait_health(target, proc=serve, log_path=tmp / "serve.log")
        opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        with grpc.insecure_channel(target, opts) as ch:
            stub = pb_grpc.DetectorStub(ch)
            for kind in args.kinds:
                reqs = requests[kind]
                for r in reqs * 3:  # warm-up
                    stub.Detect(r, timeout=30)
                spy = _py_spy(serve.pid, args.py_spy / f"{kind}.txt", args.native) if args.py_spy else None
                before = cpu_by_role(serve.pid)
                threads_before = _frontend_threads(serve.pid) if args.threads else {}
                lat, resp_bytes = [], []
                for i in range(args.requests):
                    t0 = time.perf_counter()
                    resp = stub.Detect(reqs[i % len(reqs)], timeout=30)
                    lat.append((time.perf_counter() - t0) * 1e3)
                    resp_bytes.append(resp.ByteSize())
                after = cpu_by_role(serve.pid)
                if args.threads:
                    threads_after = _frontend_threads(serve.pid)
                    by_thread[kind] = {name: (cpu - threads_before.get(name, 0.0)) / args.requests * 1e3
                                       for name, cpu in threads_after.items()}
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(60)
                per = {role: (after.get(role, 0.0) - before.get(role, 0.0)) / args.requests * 1e3
                       for role in ("frontend", "worker")}
                dec = statistics.median(decode_cpu_ms(r, 10, args.png_rows) for r in reqs)
                size = statistics.mean(r.ByteSize() for r in reqs) / 2**20
                floor = (floor_cpu_ms(reqs, int(statistics.median(resp_bytes)), args.requests)
                         if args.floor else float("nan"))
                rows.append((kind, size, per["frontend"], dec, per["frontend"] - dec, floor, per["worker"],
                             statistics.median(lat), _frontend_rss_mib(serve.pid)))
    finally:
        serve.terminate()
        serve.wait(30)
    print(f"{args.requests} requests per kind at concurrency 1, {args.width}x{args.height} RGB-D, null engine "
          f"({args.instances} instances with RLE masks{', PNG depth sent as rows' if args.png_rows else ''}), "
          "1 frontend")
    print("| request | MB | frontend CPU ms/req | of which decode | rest | bare gRPC server CPU ms/req | worker CPU ms/req "
          "| p50 ms | frontend RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, size, fe, dec, rest, floor, wk, p50, rss in rows:
        print(f"| {kind} | {size:.2f} | {fe:.2f} | {dec:.2f} | {rest:.2f} | {floor:.2f} | {wk:.2f} | {p50:.1f} | {rss:.0f} |")
    if args.py_spy:
        for kind in args.kinds:
            raw = args.py_spy / f"{kind}.txt"
            if raw.exists():
                print(f"\n{kind}: " + "\n".join(busy_main_thread(raw)))
    if by_thread:
        names = sorted({n for per in by_thread.values() for n in per},
                       key=lambda n: -max(per.get(n, 0.0) for per in by_thread.values()))
        print("\nFrontend CPU ms per request by thread (the operating system's thread names):")
        print("| thread | " + " | ".join(by_thread) + " |")
        print("|---|" + "---|" * len(by_thread))
        for name in names:
            print(f"| {name} | " + " | ".join(f"{per.get(name, 0.0):.2f}" for per in by_thread.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
