#!/usr/bin/env python3
"""The serving path's fixed cost at concurrency 1: the null engine, one frontend, source trees side by side.

Where a request's time goes when the engine is not the question: `deep-detection serve` with the
null engine (one instance per image, no network), one frontend, client shared memory allowed, started
from each source tree named (`--tree before=/tmp/before --tree after=.`: the same client, this
checkout's, talks to each), and a bare grpc.aio echo server (a separate process, the same message
sizes: the floor of gRPC in Python on this machine). One synchronous client sends, at concurrency 1:

- `raw 128x96`: a tiny raw RGB-D DetectRequest through dd.client (the fixed cost alone);
- `raw WxH`: the frame as raw tensors (4.6 MB at 1280x720) through dd.client;
- `kserve shm WxH`: a KServe ModelInferRequest with the inputs and outputs in client shared memory
  (the client copies the frame into its region each time, as a camera frame has to get there).

Rounds interleave everything (each round: every tree, every kind, `--requests` each, the trees'
order rotated), so that a busy machine slows all alike. Per kind and tree: the client's p50 and p90,
the server's timings (medians: the Detector response's Timing; for KServe, ModelStatistics read
after each request, untimed), and two differences: client + transport (client latency - server
total) and frontend + hand-offs (total - decode - queued - inference - postprocess).

    python scripts/bench_fixed_cost.py --rounds 6 --requests 100
    git archive --prefix=before/ main | tar -x -C /tmp && \\
        python scripts/bench_fixed_cost.py --tree before=/tmp/before --tree after=. --out /tmp/fixed
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
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
sys.path.insert(0, str(REPO / "scripts"))

from bench_requests import env_with_repo, free_port, wait_health  # noqa: E402

TIMING_KEYS = ("queued_us", "decode_us", "inference_us", "postprocess_us", "total_us")
OUTPUTS = (("boxes", 4 << 10), ("scores", 1 << 10), ("classes", 1 << 10), ("masks", 4 << 20))
OUTPUT_BYTES = sum(size for _, size in OUTPUTS)
GRPC_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def null_model(root: Path, instances: int) -> Path:
    folder = root / "null-rgbd"
    folder.mkdir(parents=True)
    (folder / "categories.txt").write_text("a\nb\n")
    (folder / "node_config.json").write_text(json.dumps({
        "DETECTION_TYPE": "RGBDNullServicer", "CATEGORY_FILE": "categories.txt", "SCORE_THRESH_TEST": 0.0,
        "MAX_QUEUE_DELAY_MS": 0, "ENGINE_OPTIONS": {"instances": instances}}))
    return folder


# -- the floor: a bare grpc.aio echo server in its own process -------------------------------------
def _floor_server(port_queue: multiprocessing.Queue, sizes: dict[str, int]) -> None:
    import grpc

    async def main() -> None:
        server = grpc.aio.server(options=GRPC_OPTIONS)
        bodies = {name: b"\1" * n for name, n in sizes.items()}
        handlers = {name: grpc.unary_unary_rpc_method_handler(_echo(body)) for name, body in bodies.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("floor.Floor", handlers),))
        port_queue.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def _echo(body: bytes):
    async def echo(_request: bytes, _context: object) -> bytes:
        return body
    return echo


class Floor:
    """Calls to the echo server: one method per kind, answering that kind's response size."""

    def __init__(self, sizes: dict[str, int]) -> None:
        import grpc

        ctx = multiprocessing.get_context("spawn")
        q = ctx.Queue()
        self.proc = ctx.Process(target=_floor_server, args=(q, sizes), daemon=True)
        self.proc.start()
        port = q.get(timeout=60)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
        self.calls = {name: self.channel.unary_unary(f"/floor.Floor/{name}") for name in sizes}

    def close(self) -> None:
        self.channel.close()
        self.proc.terminate()
        self.proc.join(10)


# -- one served tree ------------------------------------------------------------------------------
class Tree:
    """`deep-detection serve` from one source tree, and this checkout's clients to it."""

    def __init__(self, name: str, root: Path, model: Path, tmp: Path, frame: tuple[np.ndarray, np.ndarray]) -> None:
        import grpc

        from dd.client import DetectorClient
        from dd.proto.inference import grpc_service_pb2_grpc as kpb_grpc

        self.name, self.root = name, root
        self.port = free_port()
        run = tmp / f"run-{name}"
        self.log = open(tmp / f"serve-{name}.log", "wb")
        env = env_with_repo(root)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dd", "serve", str(model), "--host", "127.0.0.1", "--port", str(self.port),
             "--frontends", "1", "--run-dir", str(run), "--metrics-port", "0", "--allow-client-shm"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=root, env=env)
        self.target = f"127.0.0.1:{self.port}"
        wait_health(self.target, 300, self.proc, log_path=tmp / f"serve-{name}.log")
        self.client = DetectorClient(self.target, encoding="raw", timeout=60)
        self.channel = grpc.insecure_channel(self.target, options=GRPC_OPTIONS)
        self.kserve = kpb_grpc.GRPCInferenceServiceStub(self.channel)
        color, depth = frame
        self.inputs = shared_memory.SharedMemory(create=True, size=color.nbytes + depth.nbytes)
        self.outputs = shared_memory.SharedMemory(create=True, size=OUTPUT_BYTES)
        self.color_dst = np.ndarray(color.shape, np.uint8, buffer=self.inputs.buf, offset=0)
        self.depth_dst = np.ndarray(depth.shape, np.uint16, buffer=self.inputs.buf, offset=color.nbytes)
        from dd.proto.inference import grpc_service_pb2 as kpb

        self.kserve.SystemSharedMemoryRegister(kpb.SystemSharedMemoryRegisterRequest(
            name="frame", key="/" + self.inputs.name, offset=0, byte_size=self.inputs.size), timeout=30)
        self.kserve.SystemSharedMemoryRegister(kpb.SystemSharedMemoryRegisterRequest(
            name="answers", key="/" + self.outputs.name, offset=0, byte_size=OUTPUT_BYTES), timeout=30)

    def kserve_stats(self, model: str) -> dict[str, int]:
        from dd.proto.inference import grpc_service_pb2 as kpb

        s = self.kserve.ModelStatistics(kpb.ModelStatisticsRequest(name=model), timeout=30).model_stats[0]
        i = s.inference_stats
        return {"total": i.success.ns, "queued": i.queue.ns, "decode": i.compute_input.ns,
                "inference": i.compute_infer.ns, "postprocess": i.compute_output.ns}

    def close(self) -> None:
        for region in (self.inputs, self.outputs):
            region.close()
            region.unlink()
        self.client.close()
        self.channel.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def kserve_shm_request(model: str, color: np.ndarray, depth: np.ndarray):
    """The ModelInferRequest that names the regions (built once: the client's copy is timed per request)."""
    from dd.proto.inference import grpc_service_pb2 as kpb

    req = kpb.ModelInferRequest(model_name=model)
    for name, dtype, arr, offset in (("color", "UINT8", color, 0), ("depth", "UINT16", depth, color.nbytes)):
        t = req.inputs.add(name=name, datatype=dtype, shape=list(arr.shape))
        t.parameters["shared_memory_region"].string_param = "frame"
        t.parameters["shared_memory_offset"].int64_param = offset
        t.parameters["shared_memory_byte_size"].int64_param = arr.nbytes
    offset = 0
    for name, size in OUTPUTS:
        o = req.outputs.add(name=name)
        o.parameters["shared_memory_region"].string_param = "answers"
        o.parameters["shared_memory_offset"].int64_param = offset
        o.parameters["shared_memory_byte_size"].int64_param = size
        offset += size
    return req


# -- the run --------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                    help="a source tree to serve from (repeat to compare; default: this checkout)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=60, help="per kind, tree and round")
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--instances", type=int, default=1, help="the null engine's instances per image")
    ap.add_argument("--out", help="folder for fixed_cost.json, fixed_cost.md and the servers' logs")
    args = ap.parse_args()

    from dd.proto.deep_detection.v1 import detector_pb2 as pb
    from dd.proto.inference import grpc_service_pb2 as kpb

    trees = [(t.split("=", 1)[0], Path(t.split("=", 1)[1]).resolve()) for t in args.tree] or [("this", REPO)]
    tmp = Path(tempfile.mkdtemp(prefix="dd-fixed-"))
    out = Path(args.out) if args.out else tmp
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    big = (rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8),
           rng.integers(300, 3000, (args.height, args.width), dtype=np.uint16))
    tiny = (np.ascontiguousarray(big[0][:96, :128]), np.ascontiguousarray(big[1][:96, :128]))
    model = null_model(tmp, args.instances)
    from dd.client import make_request

    requests = {f"raw 128x96": make_request(*tiny, encoding="raw"),
                f"raw {args.width}x{args.height}": make_request(*big, encoding="raw")}
    shm_kind = f"kserve shm {args.width}x{args.height}"
    shm_req = kserve_shm_request(model.name, *big)
    kinds = [*requests, shm_kind]

    served: list[Tree] = []
    floor: Floor | None = None
    lat: dict[tuple[str, str], list[float]] = {}
    rounds_p50: dict[tuple[str, str], list[float]] = {}
    timings: dict[tuple[str, str], list[dict]] = {}
    try:
        for name, root in trees:
            served.append(Tree(name, root, model, tmp, big))
        # Response sizes for the floor, from the first tree.
        t0 = served[0]
        sizes = {f"k{i}": (len(requests[k].SerializeToString()),
                           t0.client.stub.Detect.with_call(requests[k], timeout=60)[0].ByteSize())
                 for i, k in enumerate(requests)}
        shm_resp = t0.kserve.ModelInfer(shm_req, timeout=60)
        sizes[f"k{len(requests)}"] = (shm_req.ByteSize(), shm_resp.ByteSize())
        floor = Floor({k: resp for k, (_req, resp) in sizes.items()})
        floor_payload = {k: b"\2" * req for k, (req, _resp) in sizes.items()}
        floor_names = dict(zip(kinds, sizes))

        def one(tree: Tree | None, kind: str) -> tuple[float, dict | None]:
            if tree is None:  # the floor
                data = floor_payload[floor_names[kind]]
                call = floor.calls[floor_names[kind]]
                t = time.perf_counter()
                call(data, timeout=60)
                return (time.perf_counter() - t) * 1e3, None
            if kind == shm_kind:
                before = tree.kserve_stats(model.name)
                t = time.perf_counter()
                np.copyto(tree.color_dst, big[0])
                np.copyto(tree.depth_dst, big[1])
                tree.kserve.ModelInfer(shm_req, timeout=60)
                ms = (time.perf_counter() - t) * 1e3
                after = tree.kserve_stats(model.name)
                return ms, {f"{k}_us": (after[k] - before[k]) / 1e3 for k in after}
            t = time.perf_counter()
            result = tree.client.detect_request(requests[kind])
            return (time.perf_counter() - t) * 1e3, result.timing

        targets: list[tuple[str, Tree | None]] = [(t.name, t) for t in served] + [("grpc floor", None)]
        for tree_name, tree in targets:  # warm-up
            for kind in kinds:
                for _ in range(5):
                    one(tree, kind)
        for r in range(args.rounds):
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            for tree_name, tree in order:
                for kind in kinds:
                    got = [one(tree, kind) for _ in range(args.requests)]
                    key = (tree_name, kind)
                    lat.setdefault(key, []).extend(ms for ms, _ in got)
                    rounds_p50.setdefault(key, []).append(statistics.median(ms for ms, _ in got))
                    timings.setdefault(key, []).extend(tm for _, tm in got if tm is not None)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k[0]} {k[1]} {rounds_p50[k][-1]:.2f}" for k in rounds_p50), flush=True)
    finally:
        if floor is not None:
            floor.close()
        for tree in served:
            tree.close()

    rows = []
    for kind in kinds:
        for tree_name, _ in targets:
            key = (tree_name, kind)
            v = lat[key]
            row = {"kind": kind, "tree": tree_name, "p50_ms": statistics.median(v),
                   "p90_ms": float(np.percentile(v, 90)), "round_p50_min_ms": min(rounds_p50[key]),
                   "round_p50_max_ms": max(rounds_p50[key]), "n": len(v)}
            if timings.get(key):
                med = {k: statistics.median(t[k] for t in timings[key]) / 1e3 for k in TIMING_KEYS}
                row.update({k.replace("_us", "_ms"): x for k, x in med.items()})
                row["client_transport_ms"] = row["p50_ms"] - med["total_us"]
                row["frontend_handoffs_ms"] = med["total_us"] - sum(med[k] for k in TIMING_KEYS[:4])
            rows.append(row)
    lines = [f"Fixed cost at concurrency 1, null engine ({args.instances} instance per image), one frontend, "
             f"{os.cpu_count()} cores, {args.rounds} rounds x {args.requests} requests per kind and tree, interleaved",
             "", "| request | server | p50 ms | p90 ms | round p50s ms | server total | decode | queued | inference "
             "| postprocess | client + transport | frontend + hand-offs |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x: float | None) -> str:
        return "" if x is None else f"{x:.2f}"

    for row in rows:
        lines.append(f"| {row['kind']} | {row['tree']} | {f(row['p50_ms'])} | {f(row['p90_ms'])} | "
                     f"{f(row['round_p50_min_ms'])}-{f(row['round_p50_max_ms'])} | {f(row.get('total_ms'))} | "
                     f"{f(row.get('decode_ms'))} | {f(row.get('queued_ms'))} | {f(row.get('inference_ms'))} | "
                     f"{f(row.get('postprocess_ms'))} | {f(row.get('client_transport_ms'))} | "
                     f"{f(row.get('frontend_handoffs_ms'))} |")
    lines += ["", "Server timings are medians in ms (the Detector response's Timing; KServe: ModelStatistics per "
              "request, where 'server total' is the frontend's own, from the parsed message to the reply). The grpc "
              "floor row: a bare grpc.aio echo of the same request and response sizes."]
    text = "\n".join(lines)
    print("\n" + text)
    (out / "fixed_cost.md").write_text(text + "\n")
    (out / "fixed_cost.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {out / 'fixed_cost.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
