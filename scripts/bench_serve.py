#!/usr/bin/env python3
"""Serving benchmark: the engine, the same engine in-process, served by deep-detection, and by a plain gRPC server.

One run, one table, side by side. Requests are RGB-D frames (1280x720 synthetic
scenes by default) of each request kind asked for (`--encodings`: JPEG + 16-bit
PNG, the standard; raw tensors; JPEG + Zstandard-compressed depth), the model a
Mask R-CNN (R50-FPN by default, fixed random weights, threshold 0 so each image
keeps its maximum detections) on the engine you name (fast on a GPU, torchvision
or null otherwise).

- engine: the worker's core (engine, then the response encoder) on decoded
  frames, in this process, at batch 1 and at each of `--engine-batches`
  (the best of them is the reference for served throughput);
- in-process: decode the request, then the same core, one after the other, as
  a script would (batch 1), per request kind;
- served: `deep-detection serve` on this machine with each `--frontends` count,
  an asyncio gRPC client (`--client-procs` processes) at each `--concurrency`,
  per request kind; CPU per answered image of the frontends and the worker
  (psutil, before and after each load);
- baseline: a single-process gRPC server whose handler decodes and infers
  (the usual way such a service is written), same client load.

`--out DIR` writes serve.json (everything, latencies included), serve.md (the
table), serve_throughput.png and serve_latency.png (matplotlib: the `bench`
extra), and the servers' logs; serve.json and serve.md are rewritten after each
phase, so a run stopped early keeps what it measured. Needs a GPU for
meaningful numbers; runs anywhere.

    python scripts/bench_serve.py --engine fast --frontends 1 4 12 --encodings jpeg+png raw jpeg+zstd \\
        --concurrency 1 4 16 64 --client-procs 4 --out $OUT/serve
    python scripts/bench_serve.py --engine fast --scale-workers 1 2 4 8   # multi-GPU scaling
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_requests import (KINDS, REPO, ClientPool, Served, cpu_by_role, cpu_delta, decode_per_core,  # noqa: E402
                            decode_request, free_port, probe, requests_of, scenes, slot_mb, stats, stop_on_sigterm,
                            threads_by_role, zstd_available)
from thread_stacks import Recording  # noqa: E402
from thread_states import StateSampler  # noqa: E402

from dd.config import DEFAULT_ARCHITECTURE, load_model_config  # noqa: E402
from dd.proto.deep_detection.v1 import detector_pb2 as pb  # noqa: E402


# Steady state: every canvas captured before SERVING, so that no background capture (the fast engine's
# largest canvases, right after load by default) shares the GPU with the timed load.
STEADY_FAST = {"max_canvases_at_load": True}


def make_model(root: Path, engine: str, arch: str, batch: int, height: int, width: int, dets: int,
               min_size: int, placement: dict | None = None, name: str = "bench",
               warmup_sizes: list[list[int]] | None = None, fast_options: dict | None = None) -> Path:
    from dd.models.model_folder import SMALL_ARCHITECTURE, random_model_folder  # torch: not in client processes

    architecture = dict(DEFAULT_ARCHITECTURE if arch == "r50" else SMALL_ARCHITECTURE, max_detections=dets)
    return random_model_folder(root / name, input_kind="rgbd", seed=0, architecture=architecture,
                               min_size=min_size, max_size=1333, score_threshold=0.0,
                               extra={"ENGINE": engine, "MAX_BATCH_SIZE": batch, "MAX_QUEUE_DELAY_MS": 0,
                                      # options are checked against the engine named: only the fast engine has these
                                      "ENGINE_OPTIONS": ({"warmup_sizes": warmup_sizes or [[height, width]],
                                                          "allow_cpu": True, **(fast_options or {})}
                                                         if engine == "fast" else {}),
                                      **(placement or {})})


def gpu_count() -> int:
    root = Path("/proc/driver/nvidia/gpus")
    return len(list(root.iterdir())) if root.is_dir() else 0


# -- engine and in-process ---------------------------------------------------------------------------
def page_locked(arr: np.ndarray) -> np.ndarray:
    """A copy of arr in page-locked memory (torch's pinned allocator)."""
    import torch

    out = torch.empty(arr.shape, dtype=torch.from_numpy(arr[:0]).dtype, pin_memory=True)
    out.numpy()[...] = arr
    return out.numpy()


def run_engine_and_in_process(folder: Path, device: str, requests: dict[str, list[bytes]], batches: list[int],
                              seconds: float) -> dict:
    """On decoded frames at each batch: the engine alone, the worker core serially and pipelined; then
    decode + core per kind (in-process)."""
    import torch

    from dd.procutil import return_large_allocations
    from dd.worker.core import WorkerCore, WorkItem
    from dd.worker.engines import load_engine

    return_large_allocations()  # as a worker process does (its responses are ~1 MB)
    cfg = load_model_config(folder)
    engine = load_engine(cfg, device)
    core = WorkerCore(cfg, engine, "in-process")  # what a worker runs: engine, then the detector_v1 encoder
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    parsed = {kind: [pb.DetectRequest.FromString(r) for r in reqs] for kind, reqs in requests.items()}
    first = next(iter(parsed.values()))
    decoded = [decode_request(r) for r in first]
    if device.startswith("cuda"):  # as a worker's inputs, which lie in a ring page-locked for DMA copies
        decoded = [tuple(page_locked(a) for a in d) for d in decoded]
    sizes: list[int] = []

    def run(items: list) -> None:
        for outcome in core.run(items):
            if outcome.code != "OK":
                raise RuntimeError(f"in-process: {outcome.code}: {outcome.message}")
            sizes.append(len(outcome.body))
        sync()

    def timed(step, n: int) -> dict:
        for k in range(3):
            step(k, n)
        lat, start, k = [], time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            step(k, n)
            lat.append((time.perf_counter() - t0) * 1e3)
            k += n
        wall = time.perf_counter() - start
        s = stats(lat, wall)
        s["images_per_s"] = n * len(lat) / wall
        return s

    from dd.worker.engines.base import EngineInput
    from dd.worker.pipeline import BatchPipeline

    def inputs(k: int, n: int) -> list:
        return [EngineInput(*decoded[(k + i) % len(decoded)][:2], cfg.score_threshold) for i in range(n)]

    def items(k: int, n: int) -> list:
        return [WorkItem(*decoded[(k + i) % len(decoded)]) for i in range(n)]

    pipe = BatchPipeline(core, lambda outs, tag: sizes.extend(len(o.body) for o in outs))

    def pipelined(k: int, n: int) -> None:
        pipe.push(items(k, n), None)

    # engine: the engine call alone (no responses); core: engine + responses one batch after another;
    # pipelined: as a worker serves at saturation (a batch's responses encoded after the next batch started).
    out: dict = {"engine": {}, "core": {}, "pipelined": {}, "in_process": {}}
    for n in sorted({1, *batches}):
        out["engine"][f"batch{n}"] = timed(lambda k, n: (engine.infer(inputs(k, n)), sync()), n)
        out["core"][f"batch{n}"] = timed(lambda k, n: run(items(k, n)), n)
        out["pipelined"][f"batch{n}"] = timed(pipelined, n)
        pipe.flush()
        print(f"batch {n}: " + ", ".join(f"{what} p50 {out[what][f'batch{n}']['p50_ms']:.2f} ms, "
                                          f"{out[what][f'batch{n}']['images_per_s']:.1f} images/s"
                                          for what in ("engine", "core", "pipelined")), flush=True)
    best = max(out["engine"], key=lambda b: out["engine"][b]["images_per_s"])
    out["engine_best"] = best
    for kind, reqs in parsed.items():
        out["in_process"][kind] = timed(lambda k, n: run([WorkItem(*decode_request(reqs[k % len(reqs)]))]), 1)
        print(f"in-process {kind} batch 1: p50 {out['in_process'][kind]['p50_ms']:.2f} ms", flush=True)
    out["response_bytes"] = int(np.median(sizes))
    engine.close()
    return out


# -- a plain single-process gRPC server (the baseline) -----------------------------------------------
def baseline_server(folder: Path, device: str, port: int) -> None:
    import grpc

    from dd.worker.core import WorkerCore, WorkItem
    from dd.worker.engines import load_engine

    cfg = load_model_config(folder)
    core = WorkerCore(cfg, load_engine(cfg, device), "baseline")
    lock = threading.Lock()

    def detect(request, context) -> bytes:
        color, depth = decode_request(request)
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


def run_baseline(folder: Path, device: str, out_dir: Path, requests: dict[str, list[bytes]],
                 concurrencies: list[int], seconds: float, clients: ClientPool, save, results: dict) -> None:
    """Fills results[kind][concurrency] with the single-process server's answers to the same load."""
    import grpc

    port = free_port()
    log = open(out_dir / "baseline.log", "wb")
    base = subprocess.Popen([sys.executable, __file__, "--baseline-server", str(folder), device, str(port)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        end = time.time() + 300
        while True:
            if base.poll() is not None:
                raise RuntimeError(f"the baseline server exited with {base.returncode}: see {out_dir / 'baseline.log'}")
            try:
                with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                    grpc.channel_ready_future(ch).result(timeout=1)
                break
            except grpc.FutureTimeoutError:
                if time.time() > end:
                    raise TimeoutError("the baseline server did not start in 300 s") from None
                time.sleep(0.5)
        for kind, reqs in requests.items():
            results[kind] = {}
            for c in concurrencies:
                before = cpu_by_role(base.pid)
                r = clients.load(f"127.0.0.1:{port}", reqs, c, seconds)
                r.update(cpu_delta(before, cpu_by_role(base.pid), r.get("n", 0), _wall(r, seconds)))
                results[kind][c] = r
                print(f"baseline {kind} c={c}: {_brief(r)}", flush=True)
                save()
    finally:
        base.send_signal(signal.SIGTERM)
        try:
            base.wait(30)
        except subprocess.TimeoutExpired:
            base.kill()
        log.close()


# -- served ----------------------------------------------------------------------------------------
def parse_variants(given: list[str], no_plain: bool = False) -> dict[str, tuple[list[str], dict | None]]:
    """--variant LABEL=WHAT values: label -> (serve flags, ENGINE_OPTIONS or None), the plain one ("") first."""
    import shlex

    out: dict[str, tuple[list[str], dict | None]] = {} if no_plain and given else {"": ([], None)}
    for text in given:
        label, sep, what = text.partition("=")
        if not sep or not label or not label.replace("-", "").replace("_", "").isalnum():
            raise SystemExit(f"--variant {text!r}: write LABEL=WHAT, LABEL letters, digits, - or _")
        what = what.strip()
        out[label] = ([], json.loads(what)) if what.startswith("{") else (shlex.split(what), None)
    return out


def serve_and_load(folder: Path, out_dir: Path, frontends: int, env: dict[str, str],
                   requests: dict[str, list[bytes]], concurrencies: list[int], seconds: float, clients: ClientPool,
                   slot: int, save, results: dict, ring_slots: int = 32, serve_args: list[str] | None = None,
                   label: str = "", thread_states: float = 0.0, thread_stacks: float = 0.0,
                   connections: int | None = None) -> None:
    """`deep-detection serve FOLDER` with this many frontends, each kind at each concurrency, then stopped.
    Fills results[kind][concurrency]; results["_skipped"][kind] says why a kind was not loaded.
    thread_states > 0: at the highest concurrency, the server's Python threads' states from py-spy dumps
    this many seconds apart (scripts/thread_states.py), in results[kind][concurrency]["thread_states"].
    thread_stacks > 0: at the highest concurrency, where the first frontend's and the first worker's threads
    are, from a py-spy recording of that many seconds (scripts/thread_stacks.py), in ...["thread_stacks"]."""
    tmp = Path(tempfile.mkdtemp(prefix="ddbench-run-", dir="/tmp"))
    log_name = f"serve_frontends{frontends}{'_' + label if label else ''}.log"
    server = Served(folder, tmp / "run", out_dir / log_name, frontends, env, slot_mb=slot,
                    ring_slots=ring_slots, extra_args=list(serve_args or []))
    server.start()
    try:
        results["start_to_serving_s"] = round(server.wait_serving(), 2)
        for kind, reqs in requests.items():
            why = probe(server.target, reqs[0])
            if why is not None:  # e.g. a server that does not know ZSTD yet: say so, go on
                results.setdefault("_skipped", {})[kind] = why
                print(f"served, {frontends} frontend(s): {kind} refused, skipped: {why}", flush=True)
                continue
            results[kind] = {}
            for c in concurrencies:
                before, threads_before = cpu_by_role(server.proc.pid), threads_by_role(server.proc.pid)
                sampler = None
                if thread_states > 0 and c == max(concurrencies):
                    sampler = StateSampler({role: server.pids(role) for role in ("frontend", "worker")},
                                           thread_states)
                    sampler.start()
                recordings = {}
                if thread_stacks > 0 and c == max(concurrencies):
                    # past the clients' connection and warm-up (ClientPool.load starts them together 1 s on)
                    recordings = {role: Recording(server.pids(role)[0], min(thread_stacks, seconds), delay=1.5)
                                  for role in ("frontend", "worker") if server.pids(role)}
                # A lone request's hops: every second one traced (and left out of the percentiles).
                r = clients.load(server.target, reqs, c, seconds, connections, trace_every=2 if c == 1 else 0)
                if recordings:
                    r["thread_stacks"] = {role: rec.result() for role, rec in recordings.items()}
                if sampler is not None:
                    r["thread_states"] = sampler.stop()
                    r["thread_state_dumps"] = sampler.dumps
                r.update(cpu_delta(before, cpu_by_role(server.proc.pid), r.get("n", 0), _wall(r, seconds),
                                   threads_before, threads_by_role(server.proc.pid)))
                results[kind][c] = r
                print(f"served, {frontends} frontend(s), {kind} c={c}: {_brief(r)}", flush=True)
                save()
    finally:
        server.stop()


def _wall(r: dict, seconds: float) -> float:
    return r["n"] / r["images_per_s"] if r.get("images_per_s") else seconds


def _brief(r: dict) -> str:
    if not r.get("n"):
        return f"no answers, errors {r.get('errors_by_code')}"
    cpu = r.get("cpu_ms_per_image", {})
    return (f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, {r['images_per_s']:.1f} images/s, "
            f"CPU ms/image {cpu}, frontends' cores each {r.get('frontend_processes', {}).get('cores_each')}, "
            f"errors {r['errors']}")


# -- the table and the pictures ----------------------------------------------------------------------
def _f(x: float | None, digits: int = 1) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def table(results: dict) -> list[str]:
    """The run's one markdown table (and its notes), from serve.json's content; partial results give the
    rows measured so far."""
    a = results.get("args", {})
    lines = [f"## Serving, {a.get('width')}x{a.get('height')} RGB-D, {a.get('arch')} {a.get('engine')} engine, "
             f"device {a.get('device')}, {results.get('cores')} cores, {results.get('started', '')}", "",
             "| path | request | frontends | concurrency | p50 ms | p99 ms | images/s | / engine best | frontend CPU "
             "ms/img | worker CPU ms/img | server CPU ms/img | client CPU ms/img | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    eng = results.get("engine", {})
    best_key = results.get("engine_best")
    best = eng.get(best_key, {}).get("images_per_s") if best_key else None

    def rel(r: dict) -> str:
        return _f(r["images_per_s"] / best, 2) if best and r.get("images_per_s") else ""

    paths = {"engine": "engine alone (engine call, no responses)",
             "core": "worker core (engine + responses, one batch after another)",
             "pipelined": "worker core, pipelined (as a worker serves)"}
    for what, path in paths.items():
        for key, r in results.get(what, {}).items():
            n = int(key.removeprefix("batch"))
            mark = " (best)" if what == "engine" and key == best_key else ""
            lines.append(f"| {path}, batch {n}{mark} | decoded | - | - | "
                         f"{_f(r.get('p50_ms'))} per batch | {_f(r.get('p99_ms'))} | {_f(r.get('images_per_s'))} | "
                         f"{rel(r)} | | | | | |")
    for kind, r in results.get("in_process", {}).items():
        lines.append(f"| in-process (decode, then engine), batch 1 | {kind} | - | 1 | {_f(r.get('p50_ms'))} | "
                     f"{_f(r.get('p99_ms'))} | {_f(r.get('images_per_s'))} | {rel(r)} | | | | | |")

    def row(path: str, kind: str, frontends: str, c, r: dict) -> str:
        cpu = r.get("cpu_ms_per_image", {})
        server = sum(v for k, v in cpu.items() if k != "client")
        if not r.get("n"):
            return (f"| {path} | {kind} | {frontends} | {c} | no answers | | | | | | | | "
                    f"{r.get('errors_by_code', '')} |")
        return (f"| {path} | {kind} | {frontends} | {c} | {_f(r['p50_ms'])} | {_f(r['p99_ms'])} | "
                f"{_f(r['images_per_s'])} | {rel(r)} | {_f(cpu.get('frontend'))} | {_f(cpu.get('worker'))} | "
                f"{_f(server)} | {_f(cpu.get('client'))} | {r.get('errors', 0) or ''} |")

    for kind in results.get("kinds", []):
        for f, per in results.get("served", {}).items():
            for c, r in per.get(kind, {}).items():
                lines.append(row("served (deep-detection serve)", kind, f, c, r))
        for c, r in results.get("baseline", {}).get(kind, {}).items():
            lines.append(row("baseline (single-process gRPC server)", kind, "-", c, r))
    lines += ["", "Notes:"]
    for kind, size in results.get("request_bytes", {}).items():
        dec = results.get("decode_images_per_s_per_core", {}).get(kind)
        lines.append(f"- {kind}: {size / 1024:.0f} KiB a request; this script's decode {_f(dec, 0)} images/s on "
                     "one core")
    for f, per in results.get("served", {}).items():
        if "start_to_serving_s" in per:
            lines.append(f"- served with {f} frontend(s): start to SERVING {per['start_to_serving_s']} s")
        if "_error" in per:
            lines.append(f"- served with {f} frontend(s): **failed**: {per['_error'].splitlines()[0][:300]} "
                         f"(its log: serve_frontends{f.replace(' ', '_')}.log)")
        for kind, why in per.get("_skipped", {}).items():
            lines.append(f"- served with {f} frontend(s): **{kind} skipped**: the server refused it ({why})")
    if "engine_error" in results:
        lines.append(f"- engine / in-process **failed**: {results['engine_error'][:300]}")
    if "baseline_error" in results:
        lines.append(f"- baseline **failed**: {results['baseline_error'][:300]} (its log: baseline.log)")
    for kind, why in results.get("kinds_skipped", {}).items():
        lines.append(f"- **{kind} skipped**: {why}")
    if "grpc_floor_ms" in results:
        lines.append(f"- a bare grpc.aio call carrying one {results['kinds'][0]} request and a "
                     f"{results.get('response_bytes')} byte response, client and server in one process: p50 "
                     f"{results['grpc_floor_ms']:.2f} ms (what any Python gRPC service pays here)")
    lines.append("- CPU ms per answered image (psutil, user + system, before and after each load; client warm-up "
                 "requests included); server = frontends + worker + supervisor, or the baseline's one process")
    return (lines + time_split_table(results) + hop_table(results) + thread_table(results) + state_table(results)
            + stack_table(results))


def _highest_loads(results: dict):  # noqa: ANN202 - yields (kind, frontends, concurrency, result)
    """Each request kind's load at its highest concurrency, per served configuration, kinds in order."""
    for kind in results.get("kinds", []):
        for f, per in results.get("served", {}).items():
            runs = per.get(kind, {})
            if runs:
                c = max(runs, key=int)
                yield kind, f, c, runs[c]


def thread_table(results: dict) -> list[str]:
    """A third table: the server's CPU ms per image by thread (frontends summed), per request kind and
    frontend count, at the highest concurrency loaded, where it was recorded: which thread saturates
    first (a worker's inference thread at 1000 ms per second of load cannot feed the GPU faster)."""
    cols, names = [], set()
    for kind, f, c, r in _highest_loads(results):
        threads = r.get("thread_cpu_ms_per_image")
        if threads and r.get("images_per_s"):
            fp = r.get("frontend_processes", {})
            threads = {**threads, **{f"frontend (the {w} process)": fp[f"{w}_ms_per_image"]
                                     for w in ("busiest", "idlest") if f"{w}_ms_per_image" in fp}}
            cols.append((f"{kind}, {f}, c={c}", threads, r["images_per_s"]))
            names.update(threads)
    if not cols:
        return []
    keep = sorted((n for n in names if max(t.get(n, 0.0) for _, t, _ in cols) >= 0.05),
                  key=lambda n: (not n.startswith("worker"), -max(t.get(n, 0.0) for _, t, _ in cols)))
    lines = ["", "### Server CPU by thread (ms per image; in brackets, the share of one core it kept busy, or for "
             "\"waiting for a core\", the cores' worth of threads ready to run that none ran)", "",
             "| thread | " + " | ".join(label for label, _, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    for n in keep:
        lines.append(f"| {n} | " + " | ".join(
            f"{t.get(n, 0.0):.2f} ({t.get(n, 0.0) * ips / 1e3:.2f})" for _, t, ips in cols) + " |")
    return lines + ["", "Threads by the operating system's names (frontends name their decode threads, workers "
                        "their inference thread); \"main thread\" is a frontend's asyncio loop or a worker's I/O loop."]


def state_table(results: dict) -> list[str]:
    """The server's Python threads' states at the highest concurrency (--thread-states), one row per
    thread name and column per served configuration and kind: how many of those threads were in each
    state in one process, on average over the dumps."""
    cols = [(f"{kind}, {f}, c={c}, {r.get('thread_state_dumps', 0)} dumps", r["thread_states"])
            for kind, f, c, r in _highest_loads(results) if r.get("thread_states")]
    if not cols:
        return []
    names = sorted({n for _, t in cols for n in t}, key=lambda n: (not n.startswith("worker"), n))
    short = {"holds the GIL": "GIL", "waits for the GIL": "waits GIL", "runs without the GIL": "runs",
             "sleeps": "sleeps"}
    lines = ["", "### Server threads' states (py-spy dumps: threads of each name in one process, on average, that "
                 "hold the GIL / wait for it / run without it / sleep)", "", "| thread | " + " | ".join(label for label, _ in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for n in names:
        cells = []
        for _, t in cols:
            st = t.get(n)
            cells.append(" / ".join(f"{st[k]:.2f}" for k in short) if st else "")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def stack_table(results: dict) -> list[str]:
    """Where one frontend's and one worker's threads were at the highest concurrency (--thread-stacks): per
    thread name, its samples, the share waiting for the GIL, and its most frequent places."""
    lines = []
    for kind, f, c, r in _highest_loads(results):
        for role, names in (r.get("thread_stacks") or {}).items():
            if not names:
                continue
            lines += ["", f"### Where the {role}'s threads were ({kind}, {f} frontends, c={c}; py-spy record, one "
                          "process; samples of all threads of a name; share waiting for the GIL)", "",
                      "| thread | samples | GIL wait | places (share of its samples) |", "|---|---|---|---|"]
            for name, s in names.items():
                places = "<br>".join(f"{share:.2f} {where.replace('|', '/')}" for where, share in s["where"])
                lines.append(f"| {name} | {s['samples']} | {s['gil_wait']:.2f} | {places} |")
    return lines


_SPLIT = ("decode", "queued", "inference", "postprocess")


def time_split(r: dict) -> dict | None:
    """Where a served request's time went, from one load's medians (ms): the server's Timing fields, and
    client + transport (client p50 - server total: the client library, gRPC both ways, the worker's reply
    back to the frontend) and frontend + hand-offs (total - decode - queued - inference - postprocess: the
    frontend before and after decoding, the worker between the engine and the encoder). None without
    timings (an older server, or no answers)."""
    if not r.get("n") or "median_total_us" not in r:
        return None
    med = {k: r[f"median_{k}_us"] / 1e3 for k in (*_SPLIT, "total")}
    return {"p50": r["p50_ms"], **med, "client_transport": r["p50_ms"] - med["total"],
            "frontend_handoffs": med["total"] - sum(med[k] for k in _SPLIT)}


# What each step between two traced hops holds (bench_requests.TRACE_HOPS), for the table's notes.
_HOP_NOTES = {
    "client_sent>handler": "the call's start reaching the frontend's handler (gRPC both sides)",
    "handler>received": "the message arriving and parsed, read to its end, admitted",
    "received>decoded": "a ring slot, the decode (its threads' hand-offs included)",
    "decoded>dispatched": "the worker message built, a worker credit",
    "dispatched>accepted": "ZeroMQ to the worker's I/O thread, its checks",
    "accepted>batch_started": "the batcher to the inference thread",
    "batch_started>replied": "engine, finishing call, encoding",
    "replied>arrived": "ZeroMQ from the inference thread back to the frontend's loop",
    "arrived>returned": "the frontend's handler resumed",
    "returned>client_received": "gRPC's response both sides, the client's parse",
}


def hop_table(results: dict) -> list[str]:
    """Where a lone traced request's time went, step by step (medians, ms): per request kind and frontend
    count, at concurrency 1 (bench_requests.load_raw's trace_every)."""
    cols = []
    for kind in results.get("kinds", []):
        for f, per in results.get("served", {}).items():
            r = per.get(kind, {}).get(1) or per.get(kind, {}).get("1")
            if r and r.get("hops_ms"):
                cols.append((f"{kind}, {f} frontends ({r['traced']} traced)", r["hops_ms"]))
    if not cols:
        return []
    lines = ["", "### A lone request's hops (concurrency 1, every second request traced; medians, ms)", "",
             "| step | " + " | ".join(label for label, _ in cols) + " | what it holds |", "|---|" + "---|" * (len(cols) + 1)]
    for step, note in _HOP_NOTES.items():
        lines.append(f"| {step.replace('>', ' > ')} | " + " | ".join(_f(h.get(step), 2) for _, h in cols) + f" | {note} |")
    lines.append("| sum | " + " | ".join(_f(sum(h.values()), 2) for _, h in cols) + " | |")
    return lines


def time_split_table(results: dict) -> list[str]:
    """A second, small table: per request kind and frontend count, at the lowest concurrency loaded."""
    rows = []
    for kind in results.get("kinds", []):
        for f, per in results.get("served", {}).items():
            runs = per.get(kind, {})
            if not runs:
                continue
            c = min(runs, key=int)
            split = time_split(runs[c])
            if split is not None:
                rows.append(f"| {kind} | {f} | {c} | " + " | ".join(_f(split[k], 2) for k in (
                    "p50", "total", *_SPLIT, "client_transport", "frontend_handoffs")) + " |")
    if not rows:
        return []
    return ["", "### Where a served request's time goes (medians, ms, the lowest concurrency loaded)", "",
            "| request | frontends | concurrency | client p50 | server total | decode | queued | inference | "
            "postprocess | client + transport | frontend + hand-offs |", "|---|---|---|---|---|---|---|---|---|---|---|",
            *rows, "",
            "Server fields: the response's Timing (total: from the frontend's start on the request to the end of "
            "the worker's encoding). client + transport = client p50 - total (the client library, gRPC both ways, "
            "the reply's way back from the worker); frontend + hand-offs = total - decode - queued - inference - "
            "postprocess (the frontend around the decode, the worker between the engine and the encoder). queued "
            "spans the frontend's send to the worker's batch start (ZeroMQ, the worker's I/O thread, the batcher)."]


def pictures(results: dict, out: Path) -> list[Path]:
    """serve_throughput.png (images/s against concurrency, a line per frontend count, one panel per request
    kind) and serve_latency.png (latency CDF at the lowest concurrency, one panel per request kind)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("no pictures: matplotlib is missing (pip install -e '.[bench]')", flush=True)
        return []
    kinds = [k for k in results.get("kinds", [])]
    if not kinds:
        return []
    best_key = results.get("engine_best")
    best = results.get("engine", {}).get(best_key, {}).get("images_per_s") if best_key else None
    served = results.get("served", {})
    baseline = results.get("baseline", {})
    title = (f"{results['args']['width']}x{results['args']['height']} RGB-D, {results['args']['arch']} "
             f"{results['args']['engine']}, {results['args']['device']}")
    paths = []

    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for f, per in served.items():
            pts = sorted((int(c), r["images_per_s"]) for c, r in per.get(kind, {}).items() if r.get("n"))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"served, {f} frontend(s)")
        pts = sorted((int(c), r["images_per_s"]) for c, r in baseline.get(kind, {}).items() if r.get("n"))
        if pts:
            ax.plot(*zip(*pts), marker="s", linestyle="--", color="gray", label="single-process gRPC server")
        if best:
            ax.axhline(best, linestyle=":", color="black", label=f"engine, {best_key.replace('batch', 'batch ')}")
        ax.set_xscale("log", base=2)
        concs = sorted({int(c) for per in [*served.values(), baseline] for c in per.get(kind, {})})
        ax.set_xticks(concs, [str(c) for c in concs])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("images/s")
        ax.set_title(kind)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Throughput against concurrency: {title}")
    fig.tight_layout()
    paths.append(out / "serve_throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    def cdf(ax, lat: list[float], **kw) -> None:
        xs = np.sort(lat)
        ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), **kw)

    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        lowest = None
        for f, per in served.items():
            runs = per.get(kind, {})
            if runs:
                lowest = min(runs, key=int)
                if runs[lowest].get("latencies_ms"):
                    cdf(ax, runs[lowest]["latencies_ms"], label=f"served, {f} frontend(s)")
        runs = baseline.get(kind, {})
        if runs:
            lowest = min(runs, key=int)
            if runs[lowest].get("latencies_ms"):
                cdf(ax, runs[lowest]["latencies_ms"], linestyle="--", color="gray", label="single-process gRPC server")
        ip = results.get("in_process", {}).get(kind, {})
        if ip.get("latencies_ms"):
            cdf(ax, ip["latencies_ms"], linestyle=":", color="black", label="in-process, batch 1")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("latency, ms")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{kind}, concurrency {lowest if lowest is not None else '?'}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Latency distribution at the lowest concurrency: {title}")
    fig.tight_layout()
    paths.append(out / "serve_latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# -- the bare gRPC floor and scaling ---------------------------------------------------------------------
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


def grpc_floor(request: bytes, response_bytes: int, seconds: float = 2.0) -> float:
    """p50 ms of a bare grpc.aio call carrying this request and a response of the served size, client and
    server in this process: what any Python gRPC service pays on this machine before doing anything."""
    import asyncio

    return asyncio.run(_grpc_floor(request, b"\0" * response_bytes, seconds))


def scaling(args: argparse.Namespace, tmp: Path, out: Path, requests: list[bytes], clients: ClientPool) -> list[dict]:
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
                            args.min_size, placement, name=f"scale{n}", fast_options=STEADY_FAST)
        concs = [c * n for c in args.per_worker_concurrency]
        served: dict = {}
        serve_and_load(folder, out, args.frontends[0], dict(os.environ), {args.encodings[0]: requests}, concs,
                       args.seconds, clients, slot_mb(args.height, args.width), lambda: None, served,
                       args.ring_slots, args.serve_arg)
        for per, conc in zip(args.per_worker_concurrency, concs):
            r = served.get(args.encodings[0], {}).get(conc, {"n": 0})
            rows.append({"workers": n, "where": where, "per_worker": per, "concurrency": conc,
                         **{k: v for k, v in r.items() if k != "latencies_ms"}})
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


# -- main ---------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", default="fast", help="fast (GPU), torchvision or null")
    ap.add_argument("--arch", default="r50", choices=["r50", "small"])
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--batch", type=int, default=8, help="MAX_BATCH_SIZE of the served model")
    ap.add_argument("--engine-batches", type=int, nargs="+",
                    help="batches the engine is timed at besides 1 (default: --batch); the best is the reference")
    ap.add_argument("--detections", type=int, default=100)
    ap.add_argument("--min-size", type=int, default=800, help="the model's shorter side")
    ap.add_argument("--encodings", nargs="+", default=["jpeg+png"], choices=KINDS,
                    help="request kinds: jpeg+png (the standard), raw tensors, jpeg+zstd (ZSTD depth; skipped with "
                         "a note where the server or this machine lacks it), jpeg+png-lib (both as the client "
                         "library writes them, which a frontend decodes in parts at once)")
    ap.add_argument("--zstd-level", type=int, default=3)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--frontends", type=int, nargs="+", default=[4],
                    help="frontend counts, one server start each (0: the server's default, from the cores)")
    ap.add_argument("--seconds", type=float, default=8.0, help="per load, and per engine / in-process row")
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--frames", type=int, default=16, help="distinct frames each kind cycles through")
    ap.add_argument("--no-baseline", action="store_true", help="leave out the single-process server")
    ap.add_argument("--scale-workers", type=int, nargs="+",
                    help="instead of the comparison, serve with each number of workers (e.g. 1 2 4 8; one per GPU "
                         "where there are enough GPUs) and print throughput and latency side by side")
    ap.add_argument("--per-worker-concurrency", type=int, nargs="+", default=[1, 4, 16],
                    help="with --scale-workers: concurrency per worker, each run for every worker count")
    ap.add_argument("--ring-slots", type=int, default=32, help="shared-memory slots per frontend")
    ap.add_argument("--client-procs", type=int, default=1,
                    help="client processes that share the load (use several for many GPUs)")
    ap.add_argument("--out", help="folder for serve.json, serve.md, the pictures and the servers' logs")
    ap.add_argument("--json", help="also write serve.json's content here (older runs' flag)")
    ap.add_argument("--serve-arg", action="append", default=[],
                    help="passed on to `deep-detection serve`, once per use: --serve-arg=--jpeg-decode=worker")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=WHAT",
                    help="a served configuration besides the plain one, for each --frontends count, in the same run: "
                         "WHAT is `deep-detection serve` flags (--variant nice5=--frontend-nice=5) or, starting "
                         "with {, ENGINE_OPTIONS for its own model folder (--variant 'bsync={\"blocking_sync\": "
                         "true}'); the plain configuration is the variant \"\"; repeatable")
    ap.add_argument("--connections", type=int, nargs="+", default=[0], metavar="N",
                    help="TCP connections of each client process (dd.client's `connections`; 0: the library's "
                         "default); several are loaded one after another, each labelled connN in the frontends "
                         "column but the default")
    ap.add_argument("--no-plain", action="store_true", help="with --variant: leave out the plain configuration")
    ap.add_argument("--thread-states", type=float, default=0.0, metavar="SECONDS",
                    help="at the highest concurrency, py-spy dumps of the frontends and workers this many seconds "
                         "apart: which threads hold the GIL, wait for it, run C code or sleep (needs py-spy)")
    ap.add_argument("--thread-stacks", type=float, default=0.0, metavar="SECONDS",
                    help="at the highest concurrency, a py-spy recording of this many seconds (at most the load's) "
                         "of the first frontend and the first worker: where each thread's samples were, and the "
                         "share waiting for the GIL (needs py-spy)")
    ap.add_argument("--baseline-server", nargs=3, metavar=("FOLDER", "DEVICE", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_server:
        baseline_server(Path(args.baseline_server[0]), args.baseline_server[1], int(args.baseline_server[2]))
        return 0
    stop_on_sigterm()

    tmp = Path(tempfile.mkdtemp(prefix="ddbench-", dir="/tmp"))
    out = Path(args.out) if args.out else tmp
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": vars(args), "cores": os.cpu_count(), "kinds": [], "kinds_skipped": {},
                     "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    def save() -> None:
        text = json.dumps(results, indent=1, default=str)
        (out / "serve.json").write_text(text)
        if args.json:
            Path(args.json).write_text(text)
        (out / "serve.md").write_text("\n".join(table(results)) + "\n")

    for kind in dict.fromkeys(args.encodings):
        if kind == "jpeg+zstd" and not zstd_available():
            results["kinds_skipped"][kind] = "the zstandard package is not installed here (pip install zstandard)"
            print(f"{kind} skipped: {results['kinds_skipped'][kind]}", flush=True)
            continue
        results["kinds"].append(kind)
    frames = scenes(args.frames, args.height, args.width)
    requests = {kind: requests_of(kind, frames, args.zstd_level) for kind in results["kinds"]}
    results["request_bytes"] = {k: float(np.mean([len(r) for r in v])) for k, v in requests.items()}
    results["decode_images_per_s_per_core"] = {k: decode_per_core(v, min(2.0, args.seconds))
                                               for k, v in requests.items()}
    print(f"requests: {args.width}x{args.height} RGB-D; model {args.arch}, engine {args.engine} on {args.device}; "
          + ", ".join(f"{k} {results['request_bytes'][k] / 1024:.0f} KiB, decode "
                      f"{results['decode_images_per_s_per_core'][k]:.0f}/s per core" for k in requests), flush=True)
    folder = make_model(tmp, args.engine, args.arch, args.batch, args.height, args.width, args.detections,
                        args.min_size, fast_options=STEADY_FAST)
    clients = ClientPool(args.client_procs)
    try:
        if args.scale_workers:
            kind = results["kinds"][0]
            rows = scaling(args, tmp, out, requests[kind], clients)
            print(f"\n## Scaling, {args.width}x{args.height} RGB-D {kind}, {args.arch} {args.engine}, "
                  f"{args.frontends[0] or 'auto'} frontends, {args.client_procs} client processes\n")
            lines = scaling_table(rows)
            print("\n".join(lines), flush=True)
            results["scaling"] = rows
            save()
            (out / "serve.md").write_text("\n".join(lines) + "\n")
            return 0

        batches = args.engine_batches or [args.batch]
        try:
            results.update(run_engine_and_in_process(folder, args.device, requests, batches, args.seconds))
        except Exception as exc:  # noqa: BLE001 - in the table; the served rows still run
            results["engine_error"] = f"{type(exc).__name__}: {exc}"
            print(f"engine / in-process failed: {exc}", flush=True)
        save()
        first = results["kinds"][0]
        results["grpc_floor_ms"] = grpc_floor(requests[first][0], results.get("response_bytes", 4096))
        save()

        gpu = args.device.split(":")[1] if args.device.startswith("cuda") else ""
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu) if gpu else dict(os.environ)
        results["served"] = {}
        variants = parse_variants(args.variant, args.no_plain)
        for f in args.frontends:
            for (label, (flags, options)), conns in itertools.product(variants.items(), args.connections):
                # "8", "8 nice5" or "8 conn1": the frontends column of the table
                key = f"{f} {label} {f'conn{conns}' if conns else ''}".strip().replace("  ", " ")
                results["served"][key] = {}
                served_folder = folder if options is None else make_model(
                    tmp, args.engine, args.arch, args.batch, args.height, args.width, args.detections,
                    args.min_size, name=f"bench-{label}", fast_options={**STEADY_FAST, **options})
                try:
                    serve_and_load(served_folder, out, f, env, requests, args.concurrency, args.seconds, clients,
                                   slot_mb(args.height, args.width), save, results["served"][key], args.ring_slots,
                                   args.serve_arg + flags,
                                   label="_".join(x for x in (label, conns and f"conn{conns}") if x),
                                   thread_states=args.thread_states, thread_stacks=args.thread_stacks,
                                   connections=conns or None)
                except Exception as exc:  # noqa: BLE001 - in the table; the other frontend counts still run
                    results["served"][key]["_error"] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
                    print(f"served with {key} frontend(s) failed: {exc}", flush=True)
                save()
        if not args.no_baseline:
            results["baseline"] = {}
            try:
                run_baseline(folder, args.device, out, requests, args.concurrency, args.seconds, clients, save,
                             results["baseline"])
            except Exception as exc:  # noqa: BLE001 - in the table
                results["baseline_error"] = f"{type(exc).__name__}: {exc}"
                print(f"baseline failed: {exc}", flush=True)
        save()
        print("\n" + "\n".join(table(results)), flush=True)
    finally:  # also when stopped early (timeout's SIGTERM): the pictures of what was measured
        clients.close()
        if not args.scale_workers:
            for p in pictures(results, out):
                print(f"wrote {p}", flush=True)
            save()
            print(f"wrote {out / 'serve.json'} and {out / 'serve.md'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
