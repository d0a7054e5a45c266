#!/usr/bin/env python3
"""The frontend's main-thread CPU per ZeroMQ round trip: zmq.asyncio against dd.frontend.loop_socket.

A DEALER in this process's event loop sends a 300-byte message to a ROUTER in another process, which
echoes it, and awaits the echo: once through zmq.asyncio's send_multipart/recv_multipart (what the
frontend used before), once through LoopSocket (a plain socket read by the loop's reader callback).
Each is timed with this thread's CPU clock over N round trips, the two alternating for --rounds, so
that a busy machine slows both alike. A frontend makes one such send and one receive per request.

    python scripts/bench_loop_socket.py --round-trips 5000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_requests import free_port  # noqa: E402

PAYLOAD = b"x" * 300
WARM_UP = 200


def echo(address: str, ready) -> None:  # noqa: ANN001
    import zmq

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(address)
    ready.set()
    while True:
        frames = router.recv_multipart()
        if frames[-1] == b"stop":
            break
        router.send_multipart(frames)
    router.close(0)
    ctx.term()


async def _thread_cpu_of(one, n: int) -> float:  # noqa: ANN001 - an async callable
    """us of this thread's CPU per call of `one`, over n calls after WARM_UP."""
    for _ in range(WARM_UP):
        await one()
    t0 = time.thread_time()
    for _ in range(n):
        await one()
    return (time.thread_time() - t0) / n * 1e6


async def via_zmq_asyncio(address: str, n: int) -> float:
    import zmq
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(address)
    try:
        async def one() -> None:
            await sock.send_multipart([b"I", PAYLOAD], flags=zmq.NOBLOCK)
            await sock.recv_multipart()

        spent = await _thread_cpu_of(one, n)
        await sock.send_multipart([b"I", b"stop"])
    finally:
        sock.close(0)
        ctx.term()
    return spent


async def via_loop_socket(address: str, n: int) -> float:
    import zmq

    from dd.frontend.loop_socket import LoopSocket

    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.connect(address)
    loop = asyncio.get_running_loop()
    waiting: list[asyncio.Future] = []
    sock = LoopSocket(raw, lambda frames: waiting.pop().set_result(frames))
    try:
        async def one() -> None:
            fut = loop.create_future()
            waiting.append(fut)
            while True:
                try:
                    sock.send([b"I", PAYLOAD])
                    break
                except zmq.Again:  # not connected yet
                    await asyncio.sleep(0.01)
            await fut

        spent = await _thread_cpu_of(one, n)
        sock.send([b"I", b"stop"])
    finally:
        sock.close()
        ctx.term()
    return spent


WAYS = {"zmq.asyncio": via_zmq_asyncio, "LoopSocket": via_loop_socket}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--round-trips", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    spawn = mp.get_context("spawn")
    got: dict[str, list[float]] = {name: [] for name in WAYS}
    for r in range(args.rounds):
        for name, way in WAYS.items():
            address = f"tcp://127.0.0.1:{free_port()}"
            ready = spawn.Event()
            peer = spawn.Process(target=echo, args=(address, ready), daemon=True)
            peer.start()
            if not ready.wait(60):
                raise SystemExit("the echo process did not start")
            got[name].append(asyncio.run(way(address, args.round_trips)))
            peer.join(30)
            if peer.is_alive():
                peer.terminate()
            print(f"round {r + 1}: {name:<12} {got[name][-1]:7.1f} us of this thread's CPU per round trip", flush=True)
    print("\n| way | us CPU per round trip, median (rounds) |\n|---|---|")
    for name, values in got.items():
        print(f"| {name} | {statistics.median(values):.1f} ({', '.join(f'{v:.1f}' for v in values)}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
