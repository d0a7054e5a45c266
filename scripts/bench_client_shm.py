#!/usr/bin/env python3
"""What client shared memory saves a local KServe client: raw RGB-D tensors in the message vs in a region.

`deep-detection serve` with the null engine (no network: what is left is the transport), or with
--engine fast an R50-FPN on the GPU, and --allow-client-shm; one synchronous gRPC client at
concurrency 1 sends the same 1280x720 RGB-D frame (UINT8 color, UINT16 depth, 4.6 MB) in
raw_input_contents, through a registered system shared-memory region, or through one with the
outputs written into a second region too, interleaved request by request so that a busy machine
slows all alike. The shared-memory time includes the client copying the frame into its region each time
(a camera frame has to get there). Prints one table, and a second with where the time went: the
server's medians from ModelStatistics read after each request (untimed; KServe responses carry no
timings): the frontend's total (from the parsed message to the worker's reply), decode (the copy into
the ring), queued, inference, postprocess (the worker's encoding, and the outputs written into the
client's region), then client + transport (p50 - total) and frontend + hand-offs (total - the four).
--json writes the numbers.

    python scripts/bench_client_shm.py --requests 300
    python scripts/bench_client_shm.py --requests 300 --engine fast      # on a GPU: the fastest local path
    python scripts/bench_client_shm.py --engine fast --fast-options '{"input_graphs": false}'
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(target: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until the server's health says SERVING; fails if the server exits first."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see its log")
        with grpc.insecure_channel(target) as ch:
            try:
                status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.5)
    raise SystemExit(f"the server at {target} was not serving after {timeout:.0f} s")


# Outputs written into the client's region in the third kind: 100 boxes, scores, classes, and the
# masks as COCO RLE (up to ~1 MB for 100 large masks of a 1280x720 frame).
OUTPUTS = (("boxes", 4 << 10), ("scores", 1 << 10), ("classes", 1 << 10), ("masks", 4 << 20))
OUTPUT_BYTES = sum(size for _, size in OUTPUTS)
SPLIT = ("total", "decode", "queued", "inference", "postprocess")  # ModelStatistics, per request


def null_model(root: Path) -> Path:
    folder = root / "null-rgbd"
    folder.mkdir()
    (folder / "categories.txt").write_text("a\nb\n")
    (folder / "node_config.json").write_text(json.dumps({
        "DETECTION_TYPE": "RGBDNullServicer", "CATEGORY_FILE": "categories.txt", "SCORE_THRESH_TEST": 0.0}))
    return folder


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=300, help="requests of each kind (default 300)")
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--engine", default="null", choices=("null", "fast", "torchvision"),
                    help="null: the transport alone; fast/torchvision: a random R50-FPN RGB-D model with 100 "
                         "detections (scripts/bench_serve.py's), on --device")
    ap.add_argument("--json", help="write the numbers here")
    ap.add_argument("--fast-options", default="{}", help='the fast engine\'s ENGINE_OPTIONS beside the steady ones, '
                    'JSON (e.g. \'{"input_graphs": false}\')')
    args = ap.parse_args()

    import grpc

    from dd.proto.inference import grpc_service_pb2 as pb
    from dd.proto.inference import grpc_service_pb2_grpc as pb_grpc

    rng = np.random.default_rng(0)
    color = rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
    depth = rng.integers(300, 3000, (args.height, args.width), dtype=np.uint16)
    tmp = Path(tempfile.mkdtemp(prefix="dd-bench-shm-"))
    if args.engine == "null":
        folder = null_model(tmp)
    else:
        sys.path.insert(0, str(REPO / "scripts"))
        from bench_serve import STEADY_FAST, make_model

        folder = make_model(tmp, args.engine, "r50", 1, args.height, args.width, 100, 800,
                            fast_options={**STEADY_FAST, **json.loads(args.fast_options)})
    model = json.loads((folder / "node_config.json").read_text()).get("NAME", folder.name)
    port = free_port()
    log = open(tmp / "serve.log", "wb")
    serve = subprocess.Popen([sys.executable, "-m", "dd", "serve", str(folder), "--host", "127.0.0.1", "--port",
                              str(port), "--frontends", "1", "--run-dir", str(tmp / "run"), "--allow-client-shm"],
                             stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    region = shared_memory.SharedMemory(create=True, size=color.nbytes + depth.nbytes)
    key = "/" + region.name
    out_region = shared_memory.SharedMemory(create=True, size=OUTPUT_BYTES)
    try:
        target = f"127.0.0.1:{port}"
        wait_health(target, serve)
        channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20),
                                                         ("grpc.max_receive_message_length", 64 << 20)])
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
            name="frame", key=key, offset=0, byte_size=color.nbytes + depth.nbytes), timeout=30)
        stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
            name="answers", key="/" + out_region.name, offset=0, byte_size=OUTPUT_BYTES), timeout=30)
        color_dst = np.ndarray(color.shape, np.uint8, buffer=region.buf, offset=0)
        depth_dst = np.ndarray(depth.shape, np.uint16, buffer=region.buf, offset=color.nbytes)

        def tensors(req: pb.ModelInferRequest) -> tuple:
            c = req.inputs.add(name="color", datatype="UINT8", shape=list(color.shape))
            d = req.inputs.add(name="depth", datatype="UINT16", shape=list(depth.shape))
            return c, d

        traces: dict[str, list[dict[str, float]]] = {}
        tracing: list[str] = []  # the kind whose next call is traced (dd-trace metadata), if any

        def infer(req: pb.ModelInferRequest) -> pb.ModelInferResponse:
            if not tracing:
                return stub.ModelInfer(req, timeout=60)
            sent = time.time()
            resp, call = stub.ModelInfer.with_call(req, timeout=60, metadata=[("dd-trace", "1")])
            hops = json.loads(dict(call.trailing_metadata())["dd-trace"])
            traces.setdefault(tracing[0], []).append({"client_sent": sent, **hops, "client_received": time.time()})
            return resp

        def in_message() -> pb.ModelInferResponse:
            req = pb.ModelInferRequest(model_name=model)
            tensors(req)
            req.raw_input_contents.extend([color.tobytes(), depth.tobytes()])
            return infer(req)

        def shm_request() -> pb.ModelInferRequest:
            np.copyto(color_dst, color)  # the frame has to get into the region too
            np.copyto(depth_dst, depth)
            req = pb.ModelInferRequest(model_name=model)
            for t, offset, size in zip(tensors(req), (0, color.nbytes), (color.nbytes, depth.nbytes)):
                t.parameters["shared_memory_region"].string_param = "frame"
                t.parameters["shared_memory_offset"].int64_param = offset
                t.parameters["shared_memory_byte_size"].int64_param = size
            return req

        def in_shm() -> pb.ModelInferResponse:
            return infer(shm_request())

        def both_in_shm() -> pb.ModelInferResponse:
            req = shm_request()
            offset = 0
            for name, size in OUTPUTS:  # each output into its own range of the answers region
                o = req.outputs.add(name=name)
                o.parameters["shared_memory_region"].string_param = "answers"
                o.parameters["shared_memory_offset"].int64_param = offset
                o.parameters["shared_memory_byte_size"].int64_param = size
                offset += size
            return infer(req)

        def server_ns() -> dict[str, int]:
            i = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=30).model_stats[0].inference_stats
            return {"total": i.success.ns, "decode": i.compute_input.ns, "queued": i.queue.ns,
                    "inference": i.compute_infer.ns, "postprocess": i.compute_output.ns}

        kinds = {"in the message": in_message, "in shared memory": in_shm,
                 "inputs and outputs in shared memory": both_in_shm}
        ms: dict[str, list[float]] = {k: [] for k in kinds}
        cpu: dict[str, float] = {k: 0.0 for k in kinds}
        server: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
        for _ in range(10):  # warm-up
            for fn in kinds.values():
                fn()
        for _ in range(args.requests):
            for name, fn in kinds.items():
                before = server_ns()
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                ms[name].append((time.perf_counter() - t0) * 1e3)
                cpu[name] += time.process_time() - c0
                after = server_ns()
                server[name].append({k: (after[k] - before[k]) / 1e6 for k in after})
            for name, fn in kinds.items():  # one more of each, traced: its hops (not in the numbers above)
                tracing[:] = [name]
                fn()
                tracing.clear()
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="frame"), timeout=30)
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="answers"), timeout=30)
        channel.close()
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
        log.close()
        for r in (region, out_region):
            r.close()
            r.unlink()

    mb = (color.nbytes + depth.nbytes) / 1e6
    print(f"{args.width}x{args.height} RGB-D raw tensors ({mb:.1f} MB), {args.engine} engine, concurrency 1, "
          f"{args.requests} requests each, interleaved; {os.cpu_count()} cores")
    print(f"{'inputs':<36}{'p50 ms':>9}{'p90 ms':>9}{'mean ms':>9}{'client CPU ms':>15}")
    result = {}
    for name in kinds:
        v = ms[name]
        row = {"p50_ms": round(statistics.median(v), 3), "p90_ms": round(percentile(v, 90), 3),
               "mean_ms": round(statistics.fmean(v), 3), "client_cpu_ms": round(cpu[name] * 1e3 / len(v), 3)}
        med = {k: statistics.median(x[k] for x in server[name]) for k in SPLIT}
        row["server_ms"] = {k: round(v, 3) for k, v in med.items()}
        row["client_transport_ms"] = round(row["p50_ms"] - med["total"], 3)
        row["frontend_handoffs_ms"] = round(med["total"] - sum(med[k] for k in SPLIT[1:]), 3)
        result[name] = row
        print(f"{name:<36}{row['p50_ms']:>9.2f}{row['p90_ms']:>9.2f}{row['mean_ms']:>9.2f}{row['client_cpu_ms']:>15.2f}")
    print("\nWhere the time went (medians, ms; the server's from ModelStatistics after each request):")
    print(f"{'inputs':<36}" + "".join(f"{h:>19}" for h in (*SPLIT, "client+transport", "frontend+hand-offs")))
    for name, row in result.items():
        print(f"{name:<36}" + "".join(f"{row['server_ms'][k]:>19.2f}" for k in SPLIT)
              + f"{row['client_transport_ms']:>19.2f}{row['frontend_handoffs_ms']:>19.2f}")
    from bench_requests import TRACE_HOPS, hop_medians

    hops = {name: hop_medians(traces.get(name, [])) for name in kinds}
    if any(hops.values()):
        print("\nA traced request's hops (one traced after each round, medians, ms):")
        print(f"{'step':<36}" + "".join(f"{name[:30]:>32}" for name in kinds))
        for a, b in zip(TRACE_HOPS, TRACE_HOPS[1:]):
            step = f"{a}>{b}"
            print(f"{step:<36}" + "".join(f"{hops[name].get(step, float('nan')):>32.2f}" for name in kinds))
        for name in kinds:
            result[name]["hops_ms"] = hops[name]
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
