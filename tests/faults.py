"""Helpers for the tests that do damage: null models, servers whose processes we can find and kill,
concurrent load that checks every answer, and the state of the shared-memory rings.

The null engine's answers are a pure function of the input pixels
(dd.worker.engines.null.null_detections), so every response can be checked
against the request it claims to answer: a response computed from another
request's pixels, or a stale slot, shows up as a wrong answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import grpc
import numpy as np
import psutil

from dd.ipc.shm_ring import ring_usage
from dd.supervisor import PROCESS_TABLE
from dd.proto.deep_detection.v1 import detector_pb2 as pb
from dd.proto.deep_detection.v1 import detector_pb2_grpc as pb_grpc
from dd.worker.engines.null import null_detections
from tests.serverproc import REPO, ServerProcess

CATEGORIES = ("a", "b")


def null_model(folder: Path, *, kind: str = "rgbd", instances: int = 4, batch: int = 4, per_device: int = 1,
               delay_ms: float = 2.0, **engine_options: Any) -> Path:
    """A null-engine model folder; engine_options: cost_ms, cost_ms_per_image, fail_on_pixel."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "categories.txt").write_text("\n".join(CATEGORIES) + "\n")
    (folder / "node_config.json").write_text(json.dumps({
        "DETECTION_TYPE": "RGBDNullServicer" if kind == "rgbd" else "RGBNullServicer",
        "CATEGORY_FILE": "categories.txt", "SCORE_THRESH_TEST": 0.0, "MAX_BATCH_SIZE": batch,
        "MAX_QUEUE_DELAY_MS": delay_ms, "INSTANCES_PER_DEVICE": per_device, "DEVICES": "cpu",
        "ENGINE_OPTIONS": dict(instances=instances, **engine_options)}))
    return folder


def write_model_folders(root: Path, models: dict[str, dict[str, Any]]) -> Path:
    """A folder of model folders, one per name: two categories, threshold 0, and the node_config keys given."""
    root.mkdir(parents=True, exist_ok=True)
    for name, cfg in models.items():
        (root / name).mkdir()
        (root / name / "categories.txt").write_text("a\nb\n")
        (root / name / "node_config.json").write_text(json.dumps(
            {"CATEGORY_FILE": "categories.txt", "SCORE_THRESH_TEST": 0.0, **cfg}))
    return root


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Polls until condition() is truthy (and returns it); fails with `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Server(ServerProcess):
    """A ServerProcess whose children can be found by role, with a chosen umask, port and run dir."""

    def __init__(self, model_path: Path, *, frontends: int = 1, args: list[str] | None = None,
                 env: dict[str, str] | None = None, umask: int | None = None, port: int | None = None,
                 run_dir: Path | None = None, ring_slots: int = 8, slot_mb: float = 1.0) -> None:
        super().__init__(model_path, frontends=frontends, env=env)
        if port is not None:
            self.port = port
        if run_dir is not None:
            os.rmdir(self.run_dir)  # the one mkdtemp made for us
            self.run_dir = run_dir
        from dd.ipc.endpoints import run_tag

        self.tag = run_tag(self.run_dir)
        self.argv = self.argv[:5] + ["--host", "127.0.0.1", "--port", str(self.port), "--frontends", str(frontends),
                                     "--run-dir", str(self.run_dir), "--slot-mb", str(slot_mb),
                                     "--ring-slots", str(ring_slots), "--metrics-port", "0"] + (args or [])
        self.umask = umask

    def start(self) -> "Server":
        self._log = open(self.log_path, "wb")
        preexec = (lambda: os.umask(self.umask)) if self.umask is not None else None
        # A session of its own, so that a test can signal the whole group as a terminal would.
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
                                     preexec_fn=preexec, start_new_session=True)
        return self

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        for p in self.processes():
            p.kill()

    # -- processes ------------------------------------------------------------------------------
    def processes(self, role: str | None = None) -> list[psutil.Process]:
        """Live children of the supervisor: role 'worker' or 'frontend', from the supervisor's process
        table (RUN_DIR/processes.json: forked workers have the zygote's command line)."""
        return [p for name, p in self._table().items() if role is None or name.startswith(f"{role}-")]

    def worker(self, model: str, index: int) -> psutil.Process | None:
        return self._table().get(f"worker-{model}.{index}")

    def _table(self) -> dict[str, psutil.Process]:
        try:
            table = json.loads((self.run_dir / PROCESS_TABLE).read_text())
        except (OSError, ValueError):
            return {}
        named = dict(table.get("children", {}))
        if table.get("zygote"):
            named["zygote"] = table["zygote"]
        out = {}
        for name, pid in named.items():
            try:
                proc = psutil.Process(pid) if pid else None
                if proc is None or proc.status() == psutil.STATUS_ZOMBIE:
                    continue
            except psutil.NoSuchProcess:
                continue
            out[name] = proc
        return out

    def all_pids(self) -> list[int]:
        return [self.proc.pid] + [p.pid for p in self.processes()]

    # -- state ----------------------------------------------------------------------------------
    def rings(self) -> list:
        return ring_usage(self.tag)

    def slots_in_use(self) -> int:
        return sum(r.in_use for r in ring_usage(self.tag))

    def ready_workers(self, model: str) -> int:
        with grpc.insecure_channel(self.target) as ch:
            try:
                models = pb_grpc.DetectorStub(ch).ListModels(pb.ListModelsRequest(), timeout=2.0).models
            except grpc.RpcError:
                return -1
        return {m.name: m.ready_workers for m in models}.get(model, -1)

    def run_dir_entries(self) -> list[str]:
        return sorted(p.name for p in self.run_dir.iterdir()) if self.run_dir.exists() else []


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv and argv.index(name) + 1 < len(argv) else None


# -- requests whose answers can be checked -------------------------------------------------------
@dataclass
class Case:
    """One request and what its answer must be."""

    request: pb.DetectRequest
    color: np.ndarray
    depth: np.ndarray | None
    instances: int = 4


def null_case(i: int, *, h: int = 24, w: int = 32, depth: bool = True, model: str = "", instances: int = 4,
              masks: bool = False) -> Case:
    """A raw RGB(-D) request, different for every i, whose null-engine answer is known."""
    rng = np.random.default_rng(i)
    color = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    d = rng.integers(0, 4000, (h, w), dtype=np.uint16) if depth else None
    req = pb.DetectRequest(model=model, request_id=f"r{i}", mask_format=pb.RLE if masks else pb.NONE,
                           color=pb.Image(data=color.tobytes(), encoding=pb.Image.RAW, shape=[h, w, 3],
                                          dtype=pb.UINT8))
    if d is not None:
        req.depth.CopyFrom(pb.Image(data=d.tobytes(), encoding=pb.Image.RAW, shape=[h, w], dtype=pb.UINT16))
    return Case(req, color, d, instances)


def answer_problem(case: Case, resp: pb.DetectResponse) -> str | None:
    """None if `resp` is the right answer to `case`, else what is wrong with it."""
    if resp.request_id != case.request.request_id:
        return f"request_id {resp.request_id!r} answers {case.request.request_id!r}"
    if (resp.height, resp.width) != case.color.shape[:2]:
        return f"size {resp.width}x{resp.height} for a {case.color.shape[1]}x{case.color.shape[0]} image"
    want = null_detections(case.color, case.depth, case.instances, len(CATEGORIES),
                           case.request.score_threshold, want_masks=False)
    got_scores = [i.score for i in resp.instances]
    got_boxes = [(i.box.x1, i.box.y1, i.box.x2, i.box.y2) for i in resp.instances]
    if len(got_scores) != len(want.scores) or not np.allclose(got_scores, want.scores, atol=1e-6) \
            or not np.allclose(np.asarray(got_boxes).reshape(-1, 4), want.boxes, atol=1e-4):
        return f"instances {got_scores} differ from the expected {want.scores.tolist()}"
    return None


@dataclass
class Outcome:
    index: int
    code: grpc.StatusCode
    details: str
    started: float  # time.monotonic()
    ended: float
    timeout: float
    problem: str | None = None  # a wrong answer
    worker: str = ""

    @property
    def latency(self) -> float:
        return self.ended - self.started


async def run_cases(target: str, cases: Iterable[Case], *, concurrency: int, timeout: float,
                    channels: int = 4, credentials: grpc.ChannelCredentials | None = None,
                    metadata: tuple | None = None) -> list[Outcome]:
    """Sends every case with at most `concurrency` in flight; checks each OK answer."""
    cases = list(cases)
    # Each channel a connection of its own: gRPC otherwise shares one among channels with equal options, and
    # `concurrency` calls on one connection past the server's max_streams_per_connection (256) are refused.
    opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
            ("grpc.use_local_subchannel_pool", 1)]
    chans = [grpc.aio.secure_channel(target, credentials, opts) if credentials
             else grpc.aio.insecure_channel(target, opts) for _ in range(channels)]
    stubs = [pb_grpc.DetectorStub(c) for c in chans]
    sem = asyncio.Semaphore(concurrency)
    out: list[Outcome] = []

    async def one(i: int, case: Case) -> None:
        async with sem:
            t0 = time.monotonic()
            try:
                resp = await stubs[i % len(stubs)].Detect(case.request, timeout=timeout, metadata=metadata)
                out.append(Outcome(i, grpc.StatusCode.OK, "", t0, time.monotonic(), timeout,
                                   answer_problem(case, resp), resp.worker))
            except grpc.aio.AioRpcError as exc:
                out.append(Outcome(i, exc.code(), exc.details() or "", t0, time.monotonic(), timeout))

    try:
        await asyncio.gather(*(one(i, c) for i, c in enumerate(cases)))
    finally:
        for c in chans:
            await c.close()
    return sorted(out, key=lambda o: o.index)


def codes(outcomes: list[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.code.name] = counts.get(o.code.name, 0) + 1
    return counts


def detect(target: str, request: pb.DetectRequest, timeout: float = 30.0, **kw: Any) -> pb.DetectResponse:
    with grpc.insecure_channel(target, [("grpc.max_send_message_length", 256 << 20)]) as ch:
        return pb_grpc.DetectorStub(ch).Detect(request, timeout=timeout, **kw)
