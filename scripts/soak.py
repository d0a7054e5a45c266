#!/usr/bin/env python3
"""Soak test: minutes of mixed load on a real server while its workers are SIGKILLed now and then.

    python scripts/soak.py --minutes 30                 # built-in null-engine models, 2 frontends
    python scripts/soak.py --model configs/models/demo-rgbd --minutes 10 --kill-every 60
    python scripts/soak.py --hostile --seconds 60 --kill-every 0   # normal clients beside hostile ones

It starts `deep-detection serve` itself (so it knows which processes to kill and
to measure), offers a mix of requests from --concurrency clients (raw and PNG
RGB-D, RGB, streams, corrupt images, calls cancelled mid-flight, deadlines too
short to meet) and every --interval seconds prints the requests done, the
statuses by kind, RSS and open file descriptors of every process, and
/dev/shm usage. Answers of null-engine models are checked against their own
request. It ends with one line:

    VERDICT: PASS ...   or   VERDICT: FAIL: <every reason>

With --hostile, hostile and clumsy clients run beside the normal ones (issue
17; docs/operations.md, "Limits"): JPEGs of thousands of scans, PNGs full of
compressed text chunks, 1 MB request ids, images too elongated for the model,
request ids that try to forge log lines on requests the engine fails, streams
that read their answers slowly, Detect calls whose message never arrives, and
a few hundred connections that only send the HTTP/2 preface. Each gets the
status it must; the normal clients' latency (p50, p99) is printed at the end
either way, with every process's memory and the size of the logs.

FAIL means: a wrong answer, a status a request of its kind must never get, a
killed worker that was not back and ready within --max-recovery seconds, a
slot not given back after the load, a process alive through the run whose memory grew (the least RSS
over the run's last quarter against the first sample: rss_growth) or whose open files grew, or an
unclean stop. Exit status 0 on PASS, 1 on FAIL.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import cv2
import grpc
import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dd.ipc.endpoints import run_tag  # noqa: E402
from dd.ipc.shm_ring import ring_usage, run_segments  # noqa: E402
from dd.procutil import process_argv  # noqa: E402
from dd.proto.deep_detection.v1 import detector_pb2 as pb  # noqa: E402
from dd.proto.deep_detection.v1 import detector_pb2_grpc as pb_grpc  # noqa: E402
from dd.worker.engines.null import null_detections  # noqa: E402

# Statuses each kind of request may end with. Anything else is a failure.
ALLOWED = {
    "unary": {"OK", "UNAVAILABLE"},  # UNAVAILABLE: its worker was killed and the retry failed too
    "png": {"OK", "UNAVAILABLE"},
    "rgb": {"OK", "UNAVAILABLE"},
    "stream": {"OK", "UNAVAILABLE"},
    "corrupt": {"INVALID_ARGUMENT"},
    "cancel": {"CANCELLED", "OK"},
    "short-deadline": {"OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNAVAILABLE"},
}
MIX = [("unary", 55), ("png", 10), ("rgb", 10), ("stream", 10), ("corrupt", 5), ("cancel", 5),
       ("short-deadline", 5)]
NORMAL = ("unary", "png", "rgb")  # the kinds whose latency is the normal clients' latency
# --hostile: what each hostile kind must get (a stream that reads slowly is still served).
HOSTILE = {
    "scan-bomb": {"INVALID_ARGUMENT"},
    "png-text-chunks": {"OK", "UNAVAILABLE"},
    "long-request-id": {"INVALID_ARGUMENT"},
    "elongated": {"INVALID_ARGUMENT"},
    "log-injection": {"INTERNAL"},
    "slow-reader-stream": {"OK", "UNAVAILABLE"},
    "stalled-upload": {"DEADLINE_EXCEEDED"},
}
ALLOWED.update(HOSTILE)
IDLE_CONNECTIONS = 200  # preface-only connections kept open (reopened when the server closes them)
FAIL_PIXEL = 7  # the rgb null model fails on images whose first pixel's red value is this (--hostile)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
RSS_GROWTH_LIMIT = 64 * 2**20
FD_GROWTH_LIMIT = 16


Sample = tuple[str, int, int]  # a process's name, RSS and open files at one sample


def rss_growth(rss: list[int]) -> int:
    """How much a process's memory grew over a run, from its RSS at each sample (the first taken after
    warm-up, the last after the load): the least it held over the run's last quarter of samples, less the
    first. A leak raises that floor; a working set that swings with the messages in flight and is given
    back does not (a frontend under --hostile load swung between 194 and 265 MiB and ended at 215, which
    the peak, compared with the first sample, had called growth)."""
    if not rss:
        return 0
    tail = rss[len(rss) - max(1, len(rss) // 4):]
    return min(tail) - rss[0]


def growth_problems(samples: dict[int, list[Sample]], lived_through: set[int]) -> list[str]:
    """The processes whose memory or open files grew, from every sample of each (the last after the load).
    Only processes alive at the first sample, taken after warm-up, are judged: a worker restarted during
    the run is first sampled as it starts, before its working set (a demo-model worker on the CPU box:
    655 MiB at its first sample, 936-1025 MiB from then on, as its first workers had held from the start)."""
    out = []
    for pid in sorted(lived_through & samples.keys()):
        seen = samples[pid]
        if len(seen) < 2:
            continue
        (name, first_rss, first_fds), fds = seen[0], seen[-1][2]
        grew = rss_growth([rss for _, rss, _ in seen])
        if grew > RSS_GROWTH_LIMIT:
            out.append(f"{name} (pid {pid}) RSS grew {first_rss >> 20} -> {(first_rss + grew) >> 20} MiB (the least "
                       f"over the run's last quarter; peak {max(rss for _, rss, _ in seen) >> 20} MiB)")
        if fds - first_fds > FD_GROWTH_LIMIT:
            out.append(f"{name} (pid {pid}) open files grew {first_fds} -> {fds}")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def null_models(root: Path, fail_on_pixel: int | None = None) -> Path:
    """Two null-engine models: RGB-D with 2 workers, RGB with 1. Answers are a function of the pixels.
    With fail_on_pixel, the RGB model fails on images whose first pixel's red value is that."""
    for name, kind, per_device in (("rgbd", "RGBDNullServicer", 2), ("rgb", "RGBNullServicer", 1)):
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "categories.txt").write_text("a\nb\n")
        options = {"instances": 4, "cost_ms": 10}
        if name == "rgb" and fail_on_pixel is not None:
            options["fail_on_pixel"] = fail_on_pixel
        (folder / "node_config.json").write_text(json.dumps({
            "DETECTION_TYPE": kind, "CATEGORY_FILE": "categories.txt", "SCORE_THRESH_TEST": 0.0, "DEVICES": "cpu",
            "MAX_BATCH_SIZE": 4, "INSTANCES_PER_DEVICE": per_device, "ENGINE_OPTIONS": options}))
    return root


class Case:
    def __init__(self, rng: np.random.Generator, rid: str, depth: bool, png: bool, model: str) -> None:
        h, w = int(rng.integers(16, 64)), int(rng.integers(16, 64))
        self.color = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if self.color[0, 0, 0] == FAIL_PIXEL:  # the value a --hostile rgb model fails on
            self.color[0, 0, 0] += 1
        self.depth = rng.integers(0, 4000, (h, w), dtype=np.uint16) if depth else None
        if png:
            color = pb.Image(data=cv2.imencode(".png", cv2.cvtColor(self.color, cv2.COLOR_RGB2BGR))[1].tobytes())
        else:
            color = pb.Image(data=self.color.tobytes(), encoding=pb.Image.RAW, shape=[h, w, 3], dtype=pb.UINT8)
        self.request = pb.DetectRequest(model=model, request_id=rid, color=color, mask_format=pb.NONE)
        if self.depth is not None:
            self.request.depth.CopyFrom(pb.Image(data=self.depth.tobytes(), encoding=pb.Image.RAW, shape=[h, w],
                                                 dtype=pb.UINT16))

    def wrong(self, resp: pb.DetectResponse) -> bool:
        if resp.request_id != self.request.request_id or (resp.height, resp.width) != self.color.shape[:2]:
            return True
        want = null_detections(self.color, self.depth, 4, 2, 0.0, want_masks=False)
        got = np.asarray([i.score for i in resp.instances], np.float32)
        return got.shape != want.scores.shape or not np.allclose(got, want.scores, atol=1e-6)


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="dd-soak-"))
        self.model_path = Path(args.model) if args.model else null_models(
            self.tmp / "models", FAIL_PIXEL if args.hostile else None)
        self.port = free_port()
        self.run_dir = self.tmp / "run"
        self.tag = run_tag(self.run_dir)
        self.check_answers = args.model is None
        self.stats: Counter = Counter()  # (kind, status) in this interval
        self.total: Counter = Counter()
        self.wrong = 0
        self.unexpected: Counter = Counter()
        self.kills = 0
        self.problems: list[str] = []
        self.samples: dict[int, list[Sample]] = {}  # pid: every sample of it
        self.first_round: set[int] | None = None  # the processes at the first sample (after warm-up)
        self.last: dict[int, Sample] = {}
        self.reported_at = 0.0
        self.recoveries: list[float] = []  # seconds from a kill to every worker ready again
        self.interval_recoveries: list[float] = []
        self.latencies: list[float] = []  # seconds, of the normal clients' answered calls (NORMAL kinds)
        self.idle_closed = 0  # preface-only connections the server closed (--hostile)

    # -- the server ---------------------------------------------------------------------------
    def start(self) -> None:
        argv = [sys.executable, "-m", "dd", "serve", str(self.model_path), "--host", "127.0.0.1", "--port",
                str(self.port), "--run-dir", str(self.run_dir), "--frontends", str(self.args.frontends),
                "--ring-slots", "16", "--slot-mb", "1", "--log-dir", str(self.tmp / "logs"),
                "--metrics-port", "0"]  # no metrics: soaks run beside other servers (8002)
        if self.args.hostile:  # short enough to be seen within a short run
            argv += ["--upload-timeout", "2", "--idle-timeout", "5"]
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 120
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}; logs in {self.tmp / 'logs'}")
            models = self.list_models()
            workers = sum(1 for name in self.processes().values() if name.startswith("worker"))
            # Every worker ready (as seen by the frontend that answered), not just one per model.
            if models and all(m.ready for m in models) and sum(m.ready_workers for m in models) == workers:
                self.models = {m.name: m for m in models}
                self.workers_planned = workers
                return
            time.sleep(0.2)
        raise SystemExit("server not ready after 120 s")

    def list_models(self) -> list:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            try:
                return list(pb_grpc.DetectorStub(ch).ListModels(pb.ListModelsRequest(), timeout=2).models)
            except grpc.RpcError:
                return []

    def processes(self) -> dict[int, str]:
        out = {self.proc.pid: "supervisor"}
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)  # forked workers are the zygote's
        except psutil.NoSuchProcess:
            return out
        for p in kids:
            try:
                argv = process_argv(p)
                if p.status() == psutil.STATUS_ZOMBIE or len(argv) < 4:
                    continue  # just died, or not yet exec'd
            except psutil.NoSuchProcess:
                continue
            role = argv[3]
            if role == "worker" and "--model" in argv and "--index" in argv:
                role = f"worker-{argv[argv.index('--model') + 1]}.{argv[argv.index('--index') + 1]}"
            elif role == "frontend":
                role = f"frontend-{p.pid}"
            out[p.pid] = role
        return out

    # -- load ----------------------------------------------------------------------------------
    async def client(self, k: int, stop_at: float) -> None:
        rng = np.random.default_rng(k)
        prng = random.Random(k)
        kinds, weights = zip(*MIX)
        rgbd = "rgbd" if "rgbd" in self.models else next(iter(self.models))
        rgb = "rgb" if "rgb" in self.models else rgbd
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            stub = pb_grpc.DetectorStub(ch)
            n = 0
            while time.monotonic() < stop_at:
                kind = prng.choices(kinds, weights)[0]
                n += 1
                rid = f"c{k}-{n}"
                t0 = time.monotonic()
                status = await self.one(stub, kind, rid, rng, prng, rgbd, rgb)
                if kind in NORMAL and status == "OK":
                    self.latencies.append(time.monotonic() - t0)
                self.stats[(kind, status)] += 1
                if status not in ALLOWED[kind]:
                    self.unexpected[(kind, status)] += 1

    async def one(self, stub, kind: str, rid: str, rng, prng, rgbd: str, rgb: str) -> str:
        depth = self.models[rgbd].input_kind == "rgbd"
        try:
            if kind == "stream":
                cases = [Case(rng, f"{rid}.{i}", depth, False, rgbd) for i in range(5)]
                by_id = {c.request.request_id: c for c in cases}
                seen = 0
                async for resp in stub.DetectStream(iter([c.request for c in cases]), timeout=30):
                    seen += 1
                    if resp.error_code:
                        return grpc.StatusCode(_code(resp.error_code)).name
                    self.check(by_id[resp.request_id], resp)
                return "OK" if seen == len(cases) else "MISSING_RESPONSES"
            if kind == "corrupt":
                data = bytes(rng.integers(0, 256, int(rng.integers(1, 2000)), dtype=np.uint8))
                await stub.Detect(pb.DetectRequest(model=rgbd, color=pb.Image(data=data)), timeout=30)
                return "OK"
            case = Case(rng, rid, depth if kind != "rgb" else self.models[rgb].input_kind == "rgbd",
                        kind == "png", rgb if kind == "rgb" else rgbd)
            if kind == "cancel":
                call = stub.Detect(case.request, timeout=30)
                await asyncio.sleep(prng.uniform(0, 0.02))
                call.cancel()
                try:
                    self.check(case, await call)
                    return "OK"
                except asyncio.CancelledError:
                    return "CANCELLED"
            timeout = 0.02 if kind == "short-deadline" else 30
            self.check(case, await stub.Detect(case.request, timeout=timeout))
            return "OK"
        except grpc.aio.AioRpcError as exc:
            return exc.code().name

    # -- hostile clients (--hostile) ---------------------------------------------------------------
    async def hostile(self, kind: str, stop_at: float) -> None:
        """One hostile client of `kind`, in a loop until stop_at; each attempt's status is counted."""
        rng = np.random.default_rng(abs(hash(kind)) % 2**32)
        payloads = self.hostile_payloads(rng)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}",
                                             options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            stub = pb_grpc.DetectorStub(ch)
            n = 0
            while time.monotonic() < stop_at:
                n += 1
                try:
                    status = await self.hostile_one(ch, stub, kind, n, payloads)
                except grpc.aio.AioRpcError as exc:
                    status = exc.code().name
                self.stats[(kind, status)] += 1
                if status not in ALLOWED[kind]:
                    self.unexpected[(kind, status)] += 1
                await asyncio.sleep(0.05)  # a steady trickle, not a flood: the limits, not the CPU, are tested

    def hostile_payloads(self, rng: np.random.Generator) -> dict[str, bytes]:
        from PIL import Image as PILImage

        rgb = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
        out = io.BytesIO()
        PILImage.fromarray(rgb).save(out, "JPEG", progressive=True, quality=90)
        jpeg = out.getvalue()
        last = jpeg.rindex(b"\xff\xda")
        png = cv2.imencode(".png", rgb)[1].tobytes()
        iend = png.rindex(b"IEND") - 4
        text = b"k\x00\x00" + zlib.compress(b"\x00" * 8_000_000, 9)
        ztxt = struct.pack(">I", len(text)) + b"zTXt" + text + struct.pack(">I", zlib.crc32(b"zTXt" + text))
        return {"scan-bomb": jpeg[:-2] + jpeg[last:-2] * 300 + b"\xff\xd9",  # 310 scans, 3.5 MB
                "png-text-chunks": png[:iend] + ztxt * 100 + png[iend:]}

    async def hostile_one(self, ch, stub, kind: str, n: int, payloads: dict[str, bytes]) -> str:
        rgb_model = "rgb" if "rgb" in self.models else next(iter(self.models))
        if kind in ("scan-bomb", "png-text-chunks"):
            await stub.Detect(pb.DetectRequest(model=rgb_model, color=pb.Image(data=payloads[kind])), timeout=30)
            return "OK"
        raw = np.full((24, 32, 3), 100, np.uint8)
        if kind == "long-request-id":
            req = pb.DetectRequest(model=rgb_model, request_id="x" * (1 << 20), color=_raw(raw))
        elif kind == "elongated":
            req = pb.DetectRequest(model=rgb_model, color=_raw(np.zeros((2, 2000, 3), np.uint8)))
        elif kind == "log-injection":
            raw[0, 0, 0] = FAIL_PIXEL
            req = pb.DetectRequest(model=rgb_model, color=_raw(raw),
                                   request_id=f"h{n}\n2026-01-01 00:00:00,000 CRITICAL [supervisor] forged")
        elif kind == "slow-reader-stream":
            reqs = [pb.DetectRequest(model=rgb_model, request_id=f"s{n}.{i}", color=_raw(raw)) for i in range(64)]
            seen = 0
            async for resp in stub.DetectStream(iter(reqs), timeout=60):
                if resp.error_code:
                    return grpc.StatusCode(_code(resp.error_code)).name
                seen += 1
                await asyncio.sleep(0.05)  # reads its answers slowly
            return "OK" if seen == len(reqs) else "MISSING_RESPONSES"
        elif kind == "stalled-upload":  # the call opens; its message never comes
            call = ch.stream_stream("/deep_detection.v1.Detector/Detect")(timeout=30)
            await call.read()
            return "OK"
        else:
            raise ValueError(kind)
        await stub.Detect(req, timeout=30)
        return "OK"

    async def idle_connections(self, stop_at: float) -> None:
        """Keeps IDLE_CONNECTIONS connections that only sent the HTTP/2 preface; reopens those the server closes."""

        async def one() -> None:
            while time.monotonic() < stop_at:
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    await asyncio.sleep(0.5)
                    continue
                try:
                    writer.write(PREFACE)
                    while await reader.read(65536):  # what the server sends (SETTINGS, GOAWAY), until it closes
                        pass
                    self.idle_closed += 1
                except OSError:
                    self.idle_closed += 1
                finally:
                    writer.close()

        tasks = [asyncio.create_task(one()) for _ in range(IDLE_CONNECTIONS)]
        await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def check(self, case: Case, resp: pb.DetectResponse) -> None:
        if self.check_answers and case.wrong(resp):
            self.wrong += 1

    # -- damage and measurement ------------------------------------------------------------------
    async def ready_workers(self, stub) -> int:
        try:
            resp = await stub.ListModels(pb.ListModelsRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return -1
        return sum(m.ready_workers for m in resp.models)

    async def monitor(self, start: float, stop_at: float) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            await self._monitor(pb_grpc.DetectorStub(ch), start, stop_at)

    async def _monitor(self, stub, start: float, stop_at: float) -> None:
        killed_at: float | None = None
        # Half a period out of step with the reports, so that a report does not always catch a worker
        # in the middle of its restart.
        next_kill = start + self.args.kill_every / 2 if self.args.kill_every > 0 else float("inf")
        next_report = start + self.args.interval
        victims = 0
        while time.monotonic() < stop_at:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            if killed_at is not None and await self.ready_workers(stub) == self.workers_planned:
                self.recoveries.append(time.monotonic() - killed_at)
                self.interval_recoveries.append(self.recoveries[-1])
                killed_at = None
            if now >= next_kill:
                next_kill += self.args.kill_every
                if killed_at is not None:
                    self.problems.append(f"a killed worker was not back {now - killed_at:.1f} s later, "
                                         "when the next kill was due")
                workers = sorted((name, pid) for pid, name in self.processes().items() if name.startswith("worker"))
                if workers:
                    name, pid = workers[victims % len(workers)]
                    victims += 1
                    try:
                        os.kill(pid, signal.SIGKILL)
                        self.kills += 1
                        killed_at = time.monotonic()
                    except ProcessLookupError:
                        pass
            if now >= next_report:
                next_report += self.args.interval
                self.report(now - start)

    def sample(self) -> dict[int, tuple[str, int, int]]:
        out = {}
        for pid, name in self.processes().items():
            try:
                p = psutil.Process(pid)
                out[pid] = (name, p.memory_info().rss, p.num_fds())
            except psutil.NoSuchProcess:
                pass
        for pid, v in out.items():
            self.samples.setdefault(pid, []).append(v)
        if self.first_round is None:
            self.first_round = set(out)
        self.last = out
        return out

    def report(self, t: float) -> None:
        elapsed = max(1e-3, t - self.reported_at)
        self.reported_at = t
        done = sum(self.stats.values())
        by_status: Counter = Counter()
        for (kind, status), n in self.stats.items():
            by_status[status] += n
        self.total.update(self.stats)
        self.stats.clear()
        procs = self.sample()
        rings = ring_usage(self.tag)
        shm = sum(r.bytes for r in rings)
        statuses = " ".join(f"{s} {n}" for s, n in sorted(by_status.items()))
        back = f" back<={max(self.interval_recoveries):.1f}s" if self.interval_recoveries else ""
        self.interval_recoveries.clear()
        mem = " ".join(f"{name}={rss / 2**20:.0f}M/{fds}fd" for name, rss, fds in sorted(procs.values()))
        print(f"t={t:5.0f}s  done {done:5d} ({done / elapsed:5.0f}/s)  {statuses} | unexpected "
              f"{sum(self.unexpected.values())} wrong {self.wrong} kills {self.kills}{back} | {mem} | /dev/shm "
              f"{len(rings)} rings {shm / 2**20:.1f} MiB, {sum(r.in_use for r in rings)} slots in use", flush=True)

    # -- the verdict ------------------------------------------------------------------------------
    def verdict(self) -> bool:
        p = self.problems
        if self.wrong:
            p.append(f"{self.wrong} wrong answer(s)")
        for (kind, status), n in sorted(self.unexpected.items()):
            p.append(f"{n} {kind} request(s) ended {status}")
        slow = [r for r in self.recoveries if r > self.args.max_recovery]
        if slow:
            p.append(f"{len(slow)} of {len(self.recoveries)} killed workers took longer than "
                     f"{self.args.max_recovery:.0f} s to be ready again (slowest {max(slow):.1f} s)")
        # Every killed worker is back.
        end = time.monotonic() + 30
        while time.monotonic() < end:
            if sum(m.ready_workers for m in self.list_models()) == self.workers_planned:
                break
            time.sleep(0.2)
        else:
            p.append(f"workers not all back 30 s after the load: {self.list_models()}")
        # Every slot back, at once.
        end = time.monotonic() + 5
        while sum(r.in_use for r in ring_usage(self.tag)) and time.monotonic() < end:
            time.sleep(0.05)
        in_use = sum(r.in_use for r in ring_usage(self.tag))
        if in_use:
            p.append(f"{in_use} ring slot(s) still in use after the load")
        if len(run_segments(self.tag)) != self.args.frontends:
            p.append(f"/dev/shm holds {run_segments(self.tag)}, expected one ring per frontend")
        if self.args.hostile:
            logs = self.tmp / "logs"
            forged = [f.name for f in logs.iterdir()
                      if any(line.startswith("2026-01-01") for line in f.read_text(errors="replace").splitlines())]
            if forged:
                p.append(f"a client forged log lines in {forged}")
        # Processes that lived through the run did not grow (the first sample is taken after warm-up).
        final = self.sample()
        p.extend(growth_problems({pid: self.samples[pid] for pid in final}, self.first_round or set()))
        return not p

    def print_end(self) -> None:
        """The normal clients' latency, every process's memory (first sample, peak, end) and the logs' size."""
        lat = np.asarray(self.latencies) * 1000
        if lat.size:
            print(f"normal clients ({'/'.join(NORMAL)}): {lat.size} answered, latency p50 {np.percentile(lat, 50):.1f} "
                  f"ms, p99 {np.percentile(lat, 99):.1f} ms, max {lat.max():.1f} ms")
        for pid, (name, rss, fds) in sorted(self.last.items(), key=lambda kv: kv[1][0]):
            seen = self.samples.get(pid, [(name, rss, fds)])
            print(f"memory {name} (pid {pid}): RSS {seen[0][1] / 2**20:.0f} MiB at the first sample, peak "
                  f"{max(v[1] for v in seen) / 2**20:.0f} MiB, end {rss / 2**20:.0f} MiB; {fds} open files"
                  f"{'' if pid in (self.first_round or ()) else ' (started during the run: not judged)'}")
        logs = self.tmp / "logs"
        if logs.is_dir():
            sizes = {p.name: p.stat().st_size for p in logs.iterdir()}
            print(f"logs: {sum(sizes.values()) / 1024:.0f} KiB in {len(sizes)} files (largest "
                  f"{max(sizes, key=sizes.get)}, {max(sizes.values()) / 1024:.0f} KiB)")
        if self.args.hostile:
            print(f"idle connections closed by the server: {self.idle_closed}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait()
                self.problems.append("the server did not stop within 60 s of SIGTERM")
            if rc != 0:
                self.problems.append(f"the server exited with {rc} on SIGTERM")
        if run_segments(self.tag):
            self.problems.append(f"shared memory left after stop: {run_segments(self.tag)}")
        if self.run_dir.exists():
            self.problems.append(f"run directory left after stop: {sorted(os.listdir(self.run_dir))}")

    async def run(self) -> None:
        start = time.monotonic()
        stop_at = start + self.args.seconds
        clients = [asyncio.create_task(self.client(k, stop_at)) for k in range(self.args.concurrency)]
        if self.args.hostile:
            clients += [asyncio.create_task(self.hostile(kind, stop_at)) for kind in HOSTILE]
            clients.append(asyncio.create_task(self.idle_connections(stop_at)))
        await self.monitor(start, stop_at)
        await asyncio.gather(*clients)
        if self.stats:
            self.report(time.monotonic() - start)


def _raw(arr: np.ndarray) -> pb.Image:
    return pb.Image(data=arr.tobytes(), encoding=pb.Image.RAW, shape=list(arr.shape), dtype=pb.UINT8)


def _code(value: int) -> tuple:
    for c in grpc.StatusCode:
        if c.value[0] == value:
            return c.value
    return grpc.StatusCode.UNKNOWN.value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model folder or repository to serve (default: built-in null models, whose "
                                    "answers are checked)")
    ap.add_argument("--minutes", type=float, help="how long to run")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long to run, if --minutes is not given")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between report lines")
    ap.add_argument("--kill-every", type=float, default=15.0, help="SIGKILL a worker this often (0: never)")
    ap.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    ap.add_argument("--frontends", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the logs and models even when the verdict is PASS")
    ap.add_argument("--hostile", action="store_true",
                    help="run hostile and clumsy clients beside the normal ones (see above)")
    ap.add_argument("--max-recovery", type=float, default=5.0,
                    help="seconds a killed worker may take to be ready again (its model's load time + margin)")
    args = ap.parse_args(argv)
    if args.minutes:
        args.seconds = args.minutes * 60
    soak = Soak(args)
    print(f"soak: {args.seconds:.0f} s, {args.concurrency} clients, a worker killed every {args.kill_every:.0f} s, "
          f"logs in {soak.tmp / 'logs'}", flush=True)
    ok = False
    try:
        soak.start()
        asyncio.run(soak.run())
        ok = soak.verdict()
    finally:
        soak.stop()
    soak.print_end()
    total = sum(soak.total.values())
    by_status: Counter = Counter()
    for (_, status), n in soak.total.items():
        by_status[status] += n
    summary = f"{total} requests ({', '.join(f'{s} {n}' for s, n in sorted(by_status.items()))}), {soak.kills} kills"
    if soak.recoveries:
        summary += f", workers back in {np.median(soak.recoveries):.1f} s (median), {max(soak.recoveries):.1f} s (max)"
    if ok and not soak.problems:
        print(f"VERDICT: PASS: {summary}, no wrong answers, no slot leaked, memory and files bounded, clean stop")
        if not args.keep:
            shutil.rmtree(soak.tmp, ignore_errors=True)
        return 0
    print(f"VERDICT: FAIL: {'; '.join(soak.problems)} ({summary}; logs in {soak.tmp / 'logs'})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
