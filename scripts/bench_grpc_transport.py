#!/usr/bin/env python3
"""What gRPC itself costs a lone call between two processes on this host, by channel and server options.

A grpc.aio server in a process of its own answers a client stream of one message (as the frontend's
Detect does) with fixed response bytes; a grpc.aio client in this process sends request bytes of
the standard request's size and times each call at concurrency 1, no protobuf either side (bytes
through). Each option set is served and called twice, the rounds interleaved, so that a noisy
machine shows as a spread between a set's two rounds. Prints p50 ms per set and round (a handler that waits: minus its wait),
and the server process's CPU per call (user + system, psutil, over the timed calls): the floor of what any
Python gRPC server pays per request of this size, against which `bench_frontend_cpu.py`'s "rest" (a
frontend's CPU per request less its decode) is read.

    python scripts/bench_grpc_transport.py --calls 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_requests import free_port  # noqa: E402

MB = 1 << 20
# Variants: channel and server options (both sides), how long the handler waits before it answers (as a
# frontend waits for its worker), and whether the messages are the Detector API's protobufs (parsed on
# both sides, the client building a dd.client Result) rather than bytes.
SETS = {
    "defaults": {},
    "16 MiB windows": {"options": [("grpc.http2.lookahead_bytes", 16 * MB)]},
    "16 MiB frames": {"options": [("grpc.http2.max_frame_size", 16 * MB - 1)]},
    "no BDP probe": {"options": [("grpc.http2.bdp_probe", 0)]},
    "handler waits 8 ms": {"wait_ms": 8.0},
    "handler waits 8 ms, spinning": {"wait_ms": 8.0, "spin": True},
    "Detector protobufs": {"protobuf": True},
    "Detector protobufs, the frontend's server options": {"protobuf": True, "frontend_server": True},
    "Detector protobufs, the client library": {"protobuf": True, "client": "library"},
    "Detector protobufs, the client library, 1 connection": {"protobuf": True, "client": "library", "connections": 1},
    "Detector protobufs, handler waits 8 ms": {"protobuf": True, "wait_ms": 8.0},
    "Detector protobufs, the frontend's allocator": {"protobuf": True, "allocator": True},
}
BASE = [("grpc.max_send_message_length", 64 * MB), ("grpc.max_receive_message_length", 64 * MB)]


def _response(nbytes: int) -> bytes:
    """A DetectResponse of 100 instances whose RLE counts add up to about `nbytes`."""
    from dd.proto.deep_detection.v1 import detector_pb2 as pb

    resp = pb.DetectResponse(request_id="r", model="m", height=720, width=1280)
    for _ in range(100):
        i = resp.instances.add(class_id=1, class_name="carton", score=0.5)
        i.box.x2, i.box.y2 = 100.0, 100.0
        i.mask.format, i.mask.height, i.mask.width = pb.RLE, 720, 1280
        i.mask.counts = os.urandom(max(1, nbytes // 100 - 40))
    return resp.SerializeToString()


def serve(port: int, variant: dict, response_bytes: int, ready) -> None:  # noqa: ANN001
    import grpc

    options, wait_s = variant.get("options", []), variant.get("wait_ms", 0.0) / 1e3
    body = _response(response_bytes) if variant.get("protobuf") else os.urandom(response_bytes)
    parse = None
    if variant.get("protobuf"):
        from dd.proto.deep_detection.v1 import detector_pb2 as pb

        parse = pb.DetectRequest.FromString

    if variant.get("allocator"):  # glibc's thresholds as a frontend sets them (dd.procutil)
        from dd.procutil import return_large_allocations

        return_large_allocations()

    async def main() -> None:
        if variant.get("frontend_server"):  # as dd.frontend.server builds its server
            from dd.config import ServerConfig
            from dd.frontend.server import grpc_options

            cfg = ServerConfig()
            server = grpc.aio.server(options=grpc_options(cfg), maximum_concurrent_rpcs=cfg.max_concurrent_calls)
        else:
            server = grpc.aio.server(options=BASE + options)

        async def handler(requests, context):  # noqa: ANN001, ANN202
            async for _ in requests:
                pass
            if wait_s and variant.get("spin"):
                until = time.perf_counter() + wait_s
                while time.perf_counter() < until:
                    pass
            elif wait_s:
                await asyncio.sleep(wait_s)
            return body

        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "bench.S", {"M": grpc.stream_unary_rpc_method_handler(handler, request_deserializer=parse)})])
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


def cpu_s(pid: int) -> float:
    """A process's CPU seconds so far (user + system)."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def call(port: int, variant: dict, request_bytes: int, calls: int, server_pid: int) -> tuple[list[float], float]:
    """p50s of `calls` timed calls, and the server's CPU ms per timed call."""
    import grpc

    options, body, kw, finish = variant.get("options", []), os.urandom(request_bytes), {}, (lambda r: r)
    if variant.get("protobuf"):
        from dd.client.api import Result
        from dd.proto.deep_detection.v1 import detector_pb2 as pb

        body = pb.DetectRequest(model="m")
        body.color.data, body.depth.data = os.urandom(request_bytes * 2 // 5), os.urandom(request_bytes * 3 // 5)
        kw = {"request_serializer": pb.DetectRequest.SerializeToString,
              "response_deserializer": pb.DetectResponse.FromString}
        finish = Result.from_proto
    if variant.get("client") == "library":  # dd.client's AsyncDetectorClient, at a bare server's method
        from dd.client import AsyncDetectorClient
        from dd.proto.deep_detection.v1 import detector_pb2_grpc as pb_grpc

        client = AsyncDetectorClient(f"127.0.0.1:{port}", connections=variant.get("connections", 8))
        for conn, channel in enumerate(client._conns.channels):
            client._conns.stubs[conn] = pb_grpc.DetectorStub(channel)
            client._conns.stubs[conn].Detect = channel.unary_unary("/bench.S/M", **kw)
        for _ in range(30):
            await client.detect_request(body)
        lat, cpu0 = [], cpu_s(server_pid)
        for _ in range(calls):
            t0 = time.perf_counter()
            await client.detect_request(body)
            lat.append((time.perf_counter() - t0) * 1e3)
        cpu = (cpu_s(server_pid) - cpu0) / calls * 1e3
        await client.close()
        return lat, cpu
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=BASE + options) as channel:
        method = channel.unary_unary("/bench.S/M", **kw)
        for _ in range(30):
            finish(await method(body))
        lat, cpu0 = [], cpu_s(server_pid)
        for _ in range(calls):
            t0 = time.perf_counter()
            finish(await method(body))
            lat.append((time.perf_counter() - t0) * 1e3)
        cpu = (cpu_s(server_pid) - cpu0) / calls * 1e3
    return lat, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--request-bytes", type=int, default=1_024_000, help="the standard JPEG + PNG request's size")
    ap.add_argument("--response-bytes", type=int, default=670_000, help="100 random-weight masks' RLE")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default="")
    ap.add_argument("--skip", nargs="*", default=[], help="variants left out")
    args = ap.parse_args()
    sizes = {"standard": (args.request_bytes, args.response_bytes), "1 KB each way": (1024, 1024)}
    out: dict[str, dict[str, list[float]]] = {}
    cpu: dict[str, dict[str, float]] = {}
    ctx = mp.get_context("spawn")
    for rnd in range(args.rounds):
        for size, (req_b, resp_b) in sizes.items():
            for name, variant in SETS.items():
                if size != "standard" and name not in ("defaults", "handler waits 8 ms") or name in args.skip:
                    continue
                port, ready = free_port(), ctx.Event()
                proc = ctx.Process(target=serve, args=(port, variant, resp_b, ready), daemon=True)
                proc.start()
                ready.wait(60)
                try:
                    lat, cpu_ms = asyncio.run(call(port, variant, req_b, args.calls, proc.pid))
                finally:
                    proc.terminate()
                    proc.join()
                key = f"{size}, {name}"
                lat = [x - variant.get("wait_ms", 0.0) for x in lat]
                out.setdefault(key, {})[f"round {rnd + 1}"] = lat
                cpu.setdefault(key, {})[f"round {rnd + 1}"] = cpu_ms
                print(f"{key:<45} round {rnd + 1}: p50 {statistics.median(lat):.3f} ms, server CPU {cpu_ms:.3f} ms/call",
                      flush=True)
    rounds_ = range(args.rounds)
    print(f"\n{'sizes, options':<45}" + "".join(f"{'p50 ms, round ' + str(r + 1):>18}" for r in rounds_)
          + "".join(f"{'CPU ms, round ' + str(r + 1):>18}" for r in rounds_))
    for key, rounds in out.items():
        print(f"{key:<45}" + "".join(f"{statistics.median(v):>18.3f}" for v in rounds.values())
              + "".join(f"{v:>18.3f}" for v in cpu[key].values()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: {r: {"p50_ms": statistics.median(v), "server_cpu_ms": cpu[k][r]} for r, v in rounds.items()}
                       for k, rounds in out.items()}, f, indent=1)


if __name__ == "__main__":
    main()
