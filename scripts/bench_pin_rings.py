#!/usr/bin/env python3
"""Page-locking shared-memory rings as a GPU worker does before it says it is ready: what it costs.

For rings whose pages were never touched (a frontend that only ftruncate'd its segment) and for rings
whose pages this process has touched (allocated, and in its page tables: what a frontend's allocation,
dd.ipc.shm_ring._allocate_pages, and a GPU worker's MAP_POPULATE mapping leave): torch's
cudaHostRegister one ring after another (what dd/worker/engines/pinned.py calls), the driver's
cuMemHostRegister through ctypes one after another, and the same in one thread per ring (ctypes releases
the GIL). Each case three times, fresh rings each time, unregistered after.

    python scripts/bench_pin_rings.py --rings 4 --mb 128     # a GPU host; about 20 s

On an H200 host (BENCHMARKS.md, S19-5): about 280 ms for four fresh 128 MiB rings, whichever way, and
25 ms once their pages are allocated: the cost is allocating and zeroing the pages, not registering them.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import threading
import time

import numpy as np
import torch


def make_rings(count: int, size: int, touch: bool) -> list[mmap.mmap]:
    rings = []
    for i in range(count):
        path = f"/dev/shm/bench-pin-{os.getpid()}-{i}"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            m = mmap.mmap(fd, size)
        finally:
            os.close(fd)
            os.unlink(path)  # the mapping keeps the pages
        if touch:
            np.frombuffer(m, np.uint8)[::4096] = 1  # a write to each page (the view goes with the statement)
        rings.append(m)
    return rings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rings", type=int, default=4)
    ap.add_argument("--mb", type=int, default=128, help="MiB per ring")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    size = args.mb << 20
    torch.zeros(1, device="cuda")  # the context, before any timing
    libcuda = ctypes.CDLL("libcuda.so.1")
    ctx = ctypes.c_void_p()
    if libcuda.cuCtxGetCurrent(ctypes.byref(ctx)) != 0 or not ctx.value:
        raise SystemExit("no current CUDA context")
    views: dict[int, ctypes.c_char] = {}

    def torch_serial(rings: list[mmap.mmap]) -> None:
        for m in rings:
            v = ctypes.c_char.from_buffer(m)
            err = int(torch.cuda.cudart().cudaHostRegister(ctypes.addressof(v), size, 0))
            if err:
                raise RuntimeError(f"cudaHostRegister returned {err}")
            views[id(m)] = v

    def driver_serial(rings: list[mmap.mmap]) -> None:
        libcuda.cuCtxSetCurrent(ctx)  # a thread of its own has no current context
        for m in rings:
            v = ctypes.c_char.from_buffer(m)
            err = libcuda.cuMemHostRegister_v2(ctypes.c_void_p(ctypes.addressof(v)), ctypes.c_size_t(size),
                                               ctypes.c_uint(0))
            if err:
                raise RuntimeError(f"cuMemHostRegister returned {err}")
            views[id(m)] = v

    def driver_threads(rings: list[mmap.mmap]) -> None:
        threads = [threading.Thread(target=driver_serial, args=([m],)) for m in rings]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    print(f"| page-locking {args.rings} rings of {args.mb} MiB, ms | pages not yet allocated | touched |")
    print("|---|---|---|")
    for name, fn in [("torch's cudaHostRegister, one after another", torch_serial),
                     ("the driver's cuMemHostRegister (ctypes), one after another", driver_serial),
                     (f"the same, {args.rings} threads", driver_threads)]:
        cells = []
        for touch in (False, True):
            times = []
            for _ in range(args.repeat):
                rings = make_rings(args.rings, size, touch)
                t0 = time.perf_counter()
                fn(rings)
                times.append((time.perf_counter() - t0) * 1000)
                for m in rings:
                    v = views.pop(id(m))
                    libcuda.cuMemHostUnregister(ctypes.c_void_p(ctypes.addressof(v)))
                    del v
                    m.close()
            cells.append(", ".join(f"{t:.0f}" for t in times))
        print(f"| {name} | {cells[0]} | {cells[1]} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
