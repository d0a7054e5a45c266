"""The worker process: owns one engine on one device, serves frontends over ZeroMQ.

This is the server around the worker's core (dd/worker/core.py: batch -> engine ->
encoder, no sockets): sockets, pings, the frontends' shared-memory rings.

Two threads. The I/O thread owns the ROUTER socket: it answers pings at once
(so a busy GPU never looks like a dead worker), checks each request (deadline,
slot generation, array bounds) and queues it. The inference thread takes
batches, runs the engine on views into the frontends' shared-memory rings,
finishes and encodes each batch while the next one is on the device
(dd/worker/pipeline.py), and sends each response to its frontend itself, over
a socket of its own to the frontend's reply socket (dd/worker/reply_routes.py);
until that is connected, it hands them to the I/O thread over an inproc socket
(ZeroMQ sockets are not shared between threads), which sends them on.

The engine module, and with it torch, is imported only after
CUDA_VISIBLE_DEVICES has been set, so each worker sees exactly its own GPU.

One bad request must not cost more than itself (the core retries a failed
batch one image at a time). Should the inference thread die all the same,
the process exits non-zero and the supervisor starts a fresh one, rather than
answering pings while never serving.

A model that cannot be loaded (a weights file in the wrong format, tensors of
the wrong shapes) will not load on the next try either, so such a worker is
not restarted over and over: it stays up, answers pings with the reason (so
every frontend can refuse the model's requests with it, and ListModels shows
it), writes the reason in one line to the run directory for the supervisor to
report, and holds no model. Fix the files, then restart the server (or stop
this worker: the supervisor starts a fresh one, which tries again). Running
out of device memory while loading may pass: that worker exits and is
restarted with backoff, like a crash.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import zmq
from google.protobuf.message import DecodeError

from dd.config import ModelConfig, ServerConfig
from dd.ipc import endpoints, messages
from dd.ipc.shm_ring import RingError, ShmRing
from dd.png_rows import ENCODING as PNG_ROWS
from dd.png_rows import PngRows, rows_nbytes
from dd.procutil import die_with_parent, format_cpulist, name_os_thread, parent_alive, return_large_allocations
from dd.worker.batcher import Batcher
from dd.worker.core import Outcome, WorkerCore, WorkItem
from dd.worker.engines.base import EncodedImage
from dd.worker.output_regions import OutputRegions
from dd.worker.pipeline import BatchPipeline
from dd.worker.reply_routes import MAX_ROUTES, ReplyRoutes

if TYPE_CHECKING:  # the engine modules import torch: only after pinning, inside the inference thread
    from dd.worker.engines.base import Engine

log = logging.getLogger("dd.worker")

_ALLOWED_DTYPES = {"uint8", "uint16", "float32"}
Send = Callable[[bytes, list], None]  # the inference thread's way to answer a frontend: (identity, frames)
# One frame on the inproc reply socket (a reply has an identity and more): the inference thread says
# the worker's state changed (loaded, or failed to load), and the I/O thread tells every frontend.
_STATE_CHANGED = b"state"


@dataclass
class Job:
    identity: bytes
    req: messages.InferRequest
    ring: ShmRing
    color: np.ndarray | EncodedImage
    depth: np.ndarray | PngRows | None
    accepted_at: float = 0.0  # time.time() when the I/O thread took it (a traced request's hops)
    batch_started_at: float = 0.0  # time.time() when its batch left the queue


def pin_process(gpu: int | None, cpus: list[int] | None, threads: int = 0) -> str:
    """Sets the GPU and CPU cores before the engine (and CUDA) is imported, then the CPU threads
    (set_cpu_threads); returns the torch device."""
    if gpu is not None and gpu >= 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    elif gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if cpus:
        import psutil

        try:
            psutil.Process().cpu_affinity(cpus)
        except (ValueError, OSError) as exc:
            log.warning("cannot pin to cores %s: %s", cpus, exc)
    n = set_cpu_threads(threads)
    log.info("worker pid %d on cores %s with %d CPU thread(s) for torch", os.getpid(),
             format_cpulist(sorted(os.sched_getaffinity(0))), n)
    return "cuda:0" if gpu is not None and gpu >= 0 else "cpu"


def set_cpu_threads(configured: int = 0) -> int:
    """Sizes torch's intra-op thread pool to this worker's cores: `configured` (--torch-threads), else
    OMP_NUM_THREADS from the environment, else the cores it is pinned to. Returns the number torch
    reports back where torch is imported (the number set, where it is not yet).

    Why here and not in the environment alone: a worker forked from the zygote (dd.zygote) has torch
    imported already, its pool sized to every core the zygote could use. Pinned to fewer (CPU workers
    split the cores), that many OpenMP threads took turns on too few cores, spinning at each barrier:
    a demo model's request took 4.3 s of CPU instead of 0.45 s on a 2-core machine."""
    n = configured if configured > 0 else _env_threads() or len(os.sched_getaffinity(0))
    os.environ["OMP_NUM_THREADS"] = str(n)  # for a torch imported after this (a worker not forked)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
        return torch.get_num_threads()
    return n


def _env_threads() -> int:
    try:
        return max(0, int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0]))
    except ValueError:
        return 0


class Worker:
    def __init__(self, model: ModelConfig, server: ServerConfig, index: int, run_dir: Path, device: str,
                 parent_pid: int | None = None) -> None:
        self.model = model
        self.server = server
        self.index = index
        self.run_dir = run_dir
        self.device = device
        self.parent_pid = parent_pid
        self.name = f"{model.name}.{index}"
        self.incarnation = f"{os.getpid()}-{time.time_ns()}"
        self.socket_path = endpoints.worker_socket(run_dir, model.name, index)
        # Never the limit in practice: every frontend may hold its full credits here (and a credit
        # comes back to a frontend whose request expired while it still waits in this queue).
        credits = server.worker_credits(model.max_batch_size)
        capacity = max(64, 2 * server.resolved_frontends() * credits)
        self.batcher: Batcher[Job] = Batcher(model.max_batch_size, model.max_queue_delay_ms / 1000.0, capacity)
        self.rings: dict[str, ShmRing] = {}
        self._retired: queue.SimpleQueue[ShmRing] = queue.SimpleQueue()
        self._to_prepare: queue.SimpleQueue[ShmRing] = queue.SimpleQueue()  # mapped, not yet prepared
        self.ready = False
        self.engine_name = model.engine
        self.gpu_jpeg = False  # the loaded engine decodes JPEGs on its GPU (told to frontends in pongs)
        self.gpu_png_rows = False  # the loaded engine reconstructs PNG depth rows on its GPU (told in pongs)
        self.load_error = ""
        self.load_failed_for_good = False  # set with load_error when retrying cannot help
        self.failure_file = endpoints.load_failure_file(run_dir, model.name, index)
        self.stop = threading.Event()
        self.ctx = zmq.Context()
        self._reply_addr = f"inproc://replies-{id(self)}"
        # Identities that pinged before the load ended (I/O thread only), told of its outcome at once;
        # collected until then only, so that frontends coming and going over months do not add up here.
        self._frontends: set[bytes] = set()
        self._announced = False
        # The frontends' reply sockets, for the inference thread to send to directly (told by the I/O
        # thread); and, I/O thread only, what each frontend last said: (reply socket, ring).
        self.routes = ReplyRoutes(self.ctx, self.name.encode())
        self._reply_to: dict[bytes, tuple[str, str]] = {}

    # -- I/O thread --------------------------------------------------------------------
    def run(self) -> int:
        # Responses of 100 masks are 0.5-1 MB: with glibc's default thresholds each serialization
        # got fresh mappings and paid a page fault per 4 KiB (0.8 ms of a 0.9 ms encode).
        return_large_allocations()
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        # Supervised, Ctrl-C (SIGINT to the whole process group) is the supervisor's to handle: it
        # stops the frontends first, so that what they have in flight here still gets answered.
        signal.signal(signal.SIGINT, signal.SIG_IGN if self.parent_pid else (lambda *_: self.stop.set()))
        die_with_parent(self.parent_pid)
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        # Credits bound the requests; the high-water marks bound pongs to a frontend that stopped reading.
        router.setsockopt(zmq.SNDHWM, 10_000)
        router.setsockopt(zmq.RCVHWM, 10_000)
        self.socket_path.unlink(missing_ok=True)  # a previous incarnation's leftover
        router.bind(endpoints.ipc_address(self.socket_path))
        os.chmod(self.socket_path, 0o600)
        replies = self.ctx.socket(zmq.PULL)
        replies.bind(self._reply_addr)
        infer_thread = threading.Thread(target=self._inference_loop, name="inference", daemon=True)
        infer_thread.start()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(replies, zmq.POLLIN)
        log.info("worker %s listening on %s (device %s)", self.name, self.socket_path, self.device)
        try:
            while not self.stop.is_set():
                events = dict(poller.poll(200))
                if replies in events:
                    self._forward_replies(router, replies)
                if router in events:
                    self._drain(router)
                if not parent_alive(self.parent_pid):
                    log.warning("supervisor is gone; worker %s exits", self.name)
                    break
                if self.load_failed_for_good:
                    continue  # stays up to say why; a restart would fail the same way
                if self.load_error and not infer_thread.is_alive():
                    # Keep answering pings for a moment so frontends learn why, then exit for a restart.
                    until = time.monotonic() + 0.6
                    while time.monotonic() < until:
                        if router.poll(100):
                            self._drain(router)
                    return 3
                if not infer_thread.is_alive() and not self.stop.is_set():
                    log.error("worker %s: the inference thread died; exiting for a restart", self.name)
                    return 4
        finally:
            self.stop.set()
            self.batcher.close()
            infer_thread.join(timeout=self.server.grace_s + 5)
            if not infer_thread.is_alive():
                # Its reply sockets, should it have died without closing them: an open socket keeps the
                # context's term() below waiting for ever (a worker alive, deaf, never restarted).
                self.routes.close()
            # Flush the replies the inference thread produced while stopping.
            self._forward_replies(router, replies)
            router.close(linger=100)
            replies.close(linger=0)
            self.socket_path.unlink(missing_ok=True)
            self.failure_file.unlink(missing_ok=True)
            for ring in self.rings.values():
                ring.close()
            self.ctx.term()
            log.info("worker %s stopped", self.name)
        return 0

    def _forward_replies(self, router: zmq.Socket, replies: zmq.Socket) -> None:
        """Sends the frontends what the inference thread produced: replies, and state changes."""
        while True:
            try:
                frames = replies.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) == 1:  # _STATE_CHANGED
                self._announce(router)
            else:
                router.send_multipart(frames, copy=False)

    def _announce(self, router: zmq.Socket) -> None:
        """An unasked pong to every frontend that has pinged: it learns that this worker is ready (or
        why it is not) now, not at its next ping. Health turns SERVING that much sooner at start."""
        pong = self._pong(0.0)
        for identity in self._frontends:
            try:
                router.send_multipart([identity, messages.PONG, pong], flags=zmq.NOBLOCK)
            except zmq.ZMQError:  # gone, or not reading: its next ping gets the same answer
                pass
        self._frontends.clear()
        self._announced = True

    def _pong(self, sent_at: float) -> bytes:
        pong = messages.Pong(sent_at=sent_at, incarnation=self.incarnation, pid=os.getpid(), ready=self.ready, engine=self.engine_name,
                             device=self.device, error=self.load_error, gpu_jpeg=self.gpu_jpeg,
                             gpu_png_rows=self.gpu_png_rows)
        return pong.SerializeToString()

    def _handle(self, router: zmq.Socket, frames: list[bytes]) -> None:
        if len(frames) < 3:
            return
        identity, kind, payload = frames[0], frames[1], frames[2]
        if kind == messages.PING:
            if not self._announced:
                self._frontends.add(identity)
            ping = messages.Ping.FromString(payload)
            router.send_multipart([identity, messages.PONG, self._pong(ping.sent_at)])
            self._route(identity, ping.reply_to, ping.ring)
            ring = ping.ring
            if ring and ring not in self.rings:
                try:  # mapped now, prepared by the inference thread before the frontend's first request
                    self._ring(ring)
                except (RingError, OSError) as exc:
                    log.warning("cannot attach ring %s: %s", ring, exc)  # its first request will say so
            return
        if kind != messages.INFER:
            log.warning("unknown message kind %r from %r", kind, identity)
            return
        req = messages.InferRequest.FromString(payload)
        job, problem = self._accept(identity, req)
        if job is None:
            if problem is not None:
                router.send_multipart([identity, messages.REPLY, _reply(req.id, *problem)])
            return
        if not self.batcher.put(job):
            router.send_multipart([identity, messages.REPLY,
                                   _reply(req.id, "RESOURCE_EXHAUSTED", f"worker {self.name} queue is full")])

    def _route(self, identity: bytes, reply_to: str, ring: str) -> None:
        """Tells the inference thread where this frontend takes its replies, when that is new."""
        if self._reply_to.get(identity, ("", ""))[0] != reply_to:
            self.routes.tell(identity, reply_to)
        self._reply_to[identity] = (reply_to, ring)
        if len(self._reply_to) > MAX_ROUTES:  # frontends gone without their ring being removed
            oldest = next(iter(self._reply_to))
            del self._reply_to[oldest]
            self.routes.tell(oldest, "")

    def _accept(self, identity: bytes, req: messages.InferRequest) -> tuple[Job | None, tuple[str, str] | None]:
        """A Job, or why not. (None, None) means drop silently: the frontend no longer waits for it."""
        if not self.ready:
            if self.load_error:
                return None, ("UNAVAILABLE", f"model {self.model.name!r} failed to load: {self.load_error}")
            return None, ("UNAVAILABLE", f"worker {self.name} is not ready")
        if req.deadline and time.time() > req.deadline:
            return None, ("DEADLINE_EXCEEDED", "deadline passed before the worker got the request")
        try:
            ring = self._ring(req.ring)
        except (RingError, OSError) as exc:
            # Say so rather than drop it: the frontend (if alive) would wait until the deadline.
            log.warning("cannot attach ring %s: %s", req.ring, exc)
            return None, ("INTERNAL", f"worker {self.name} cannot map the frontend's shared memory: {exc}")
        if req.slot >= ring.slots or ring.generation(req.slot) != req.generation:
            return None, None  # stale: the slot has moved on
        try:
            color = _color(ring, req.slot, req.color)
            depth = _depth(ring, req.slot, req.depth) if req.has_depth else None
        except (RingError, ValueError) as exc:
            return None, ("INTERNAL", f"bad array reference from the frontend: {exc}")
        return Job(identity, req, ring, color, depth, time.time()), None

    def _drain(self, router: zmq.Socket) -> None:
        """Handles every message waiting on the frontends' socket."""
        while True:
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._handle(router, frames)
            except DecodeError:
                log.warning("malformed message from a frontend (%d frame(s)); dropped", len(frames))

    def _ring(self, name: str) -> ShmRing:
        """The frontend's ring, mapped at the first ping or request that names it; a new one is queued
        for the inference thread to have the engine prepare (page-lock) it before its first batch."""
        ring = self.rings.get(name)
        if ring is None:
            ring = ShmRing.attach(name, populate=self.device.startswith("cuda"))  # page-locked before use
            self.rings[name] = ring
            self._to_prepare.put(ring)
            self._forget_dead_rings()
        return ring

    def _prepare_new_rings(self, engine: "Engine") -> None:
        """Inference thread: the engine prepares each ring the I/O thread has mapped since the last call
        (the fast engine page-locks it: on the path to ready at start-up, so it is logged)."""
        count, t0 = 0, time.perf_counter()
        while True:
            try:
                ring = self._to_prepare.get_nowait()
            except queue.Empty:
                break
            if not ring.retired:
                engine.prepare_input_memory(ring.mapping)
                count += 1
        if count:
            log.info("worker %s prepared %d frontend ring(s) for its engine in %.2f s", self.name, count,
                     time.perf_counter() - t0)

    def _forget_dead_rings(self) -> None:
        """Retires the rings of frontends that have gone (their segment was removed): the inference
        thread releases them from the engine (which may have page-locked them) and unmaps them,
        between batches, and drops their requests still queued, which nobody waits for."""
        for name in list(self.rings):
            if not Path("/dev/shm", name).exists():
                ring = self.rings.pop(name)
                ring.retired = True
                self._retired.put(ring)
                for identity, (_, its_ring) in list(self._reply_to.items()):
                    if its_ring == name:  # that frontend is gone: so is its reply socket
                        del self._reply_to[identity]
                        self.routes.tell(identity, "")

    def _release_retired(self, engine: "Engine | None") -> None:
        while True:
            try:
                ring = self._retired.get_nowait()
            except queue.Empty:
                return
            if engine is not None:
                engine.release_input_memory(ring.mapping)
            ring.close()

    # -- inference thread ----------------------------------------------------------------
    def _inference_loop(self) -> None:
        name_os_thread()  # "inference" in top -H and per-thread CPU (scripts/bench_serve.py)
        out = self.ctx.socket(zmq.PUSH)
        out.setsockopt(zmq.LINGER, 1000)
        out.connect(self._reply_addr)

        def send(identity: bytes, frames: list) -> None:
            """To the frontend's reply socket; through the I/O thread where that cannot take it now."""
            if not self.routes.send(identity, frames):
                out.send_multipart([identity, *frames], copy=False)

        try:
            from dd.worker.engines import load_engine

            t0 = time.perf_counter()
            # With jpeg_decode "frontend" no JPEG reaches the engine: its warm-up may leave them out.
            engine = load_engine(self.model, self.device, receives_jpeg=self.server.jpeg_decode != "frontend")
            log.info("worker %s loaded %s engine in %.1f s", self.name, engine.name, time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - any load failure is reported the same way
            self._load_failed(exc)
            out.send(_STATE_CHANGED)
            self.routes.close()
            out.close()
            return
        self.engine_name = engine.name  # what runs, after any fallback (the fast engine without a GPU)
        self.gpu_jpeg = engine.decodes_jpeg_on_gpu()
        if self.gpu_jpeg:
            log.info("worker %s decodes JPEGs on its GPU: frontends with jpeg_decode auto send them compressed",
                     self.name)
        self.gpu_png_rows = engine.unfilters_png_rows_on_gpu()
        if self.gpu_png_rows:
            log.info("worker %s reconstructs 16-bit PNG depth rows on its GPU: frontends send them as rows", self.name)
        core = WorkerCore(self.model, engine, self.name)
        try:
            core.warm_up()
        except Exception:  # noqa: BLE001 - a warm-up only moves first-call costs; the first request would say more
            log.exception("worker %s: warming up the response encoders failed", self.name)

        def failed(live: list[Job], exc: BaseException) -> None:
            for job in live:
                _send(send, job, "INTERNAL", f"worker {self.name} failed on this batch; see its log")

        def between() -> None:  # after a batch is finished; the next may be on the device (the engine waits for it
            self._release_retired(engine)  # before unpinning a ring it may be copying from)
            self._prepare_new_rings(engine)
            self.routes.apply()  # connected while idle, so that the next reply finds its route up

        pipeline: BatchPipeline[list[Job]] = BatchPipeline(
            core, lambda outcomes, live: _send_outcomes(send, live, outcomes), failed, between=between)
        self._prepare_new_rings(engine)  # the rings of the frontends that pinged while the model loaded
        self.ready = True
        out.send(_STATE_CHANGED)
        while True:
            # With a batch on the device, take the next one only if it is there already; else answer.
            batch = self.batcher.get_batch(timeout=0.0 if pipeline.busy else 0.2)
            if not batch:
                if pipeline.busy:
                    pipeline.flush()
                    continue
                between()
                if self.stop.is_set():
                    break
                continue
            if not pipeline.busy:
                between()  # (with a batch in flight the pipeline calls it once that batch is finished)
            try:
                self._run_batch(pipeline, batch, send)
            except Exception:  # noqa: BLE001 - never let one batch end the loop
                log.exception("worker %s: unexpected error serving a batch of %d", self.name, len(batch))
                for job in batch:
                    _send(send, job, "INTERNAL", f"worker {self.name} failed on this batch; see its log")
            del batch
        pipeline.flush()
        engine.close()
        self._release_retired(None)
        self.routes.close()
        out.close()

    def _load_failed(self, exc: Exception) -> None:
        """One line that says which model and what is wrong (the message names the file); the
        traceback only at DEBUG: it says where in the loader, which the user does not need."""
        log.debug("worker %s: loading failed", self.name, exc_info=exc)
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        transient = _may_pass(exc)
        self.load_failed_for_good = not transient
        self.load_error = reason
        if transient:
            log.error("worker %s: cannot load model %r (%s): %s; exiting for a restart", self.name,
                      self.model.name, self.model.config_path, reason)
            return
        # Under the supervisor, it reports this line (from the file) rather than both saying it.
        (log.debug if self.parent_pid else log.error)(
            "worker %s: model %r (%s) cannot be loaded: %s", self.name, self.model.name, self.model.config_path,
            reason)
        try:  # whole or not at all: the supervisor may look at any moment
            tmp = self.failure_file.with_name(self.failure_file.name + ".tmp")
            tmp.write_text(f"{reason}\n")
            tmp.replace(self.failure_file)
        except OSError as err:
            log.warning("cannot write %s: %s", self.failure_file, err)

    def _run_batch(self, pipeline: "BatchPipeline[list[Job]]", batch: list[Job], send: "Send") -> None:
        """Sends what is already decided (expired, abandoned) and pushes the rest into the pipeline:
        their engine call starts now, they are answered after the next batch has started (or flushed)."""
        started = time.time()
        live: list[Job] = []
        for job in batch:
            job.batch_started_at = started
            if job.ring.retired:
                continue  # its frontend is gone, and with it whoever asked
            if job.req.deadline and started > job.req.deadline:
                _send(send, job, "DEADLINE_EXCEEDED", "deadline passed while queued at the worker")
            elif job.ring.generation(job.req.slot) == job.req.generation:
                live.append(job)
            # else: the frontend gave up on it (cancelled, retried elsewhere); nobody waits for it
        if live:
            pipeline.push([_work_item(job) for job in live], live, started)


def _send_outcomes(send: "Send", live: list[Job], outcomes: list[Outcome]) -> None:
    """One reply per job: its error, or the reply envelope and the encoded body (sent without a copy)."""
    for job, outcome in zip(live, outcomes):
        if outcome.code != "OK":
            _send(send, job, outcome.code, outcome.message)
            continue
        if job.ring.generation(job.req.slot) != job.req.generation:
            continue  # the frontend gave up on it meanwhile (and may have reused the slot)
        t = outcome.timings
        reply = messages.InferReply(id=job.req.id, code="OK", queue_us=t.queue_us, decode_us=t.decode_us,
                                    inference_us=t.inference_us, encode_us=t.encode_us,
                                    batch_size=t.batch_size, accepted_at=job.accepted_at,
                                    batch_started_at=job.batch_started_at, replied_at=time.time())
        send(job.identity, [messages.REPLY, reply.SerializeToString(), outcome.body])


def _work_item(job: Job) -> WorkItem:
    req = job.req
    return WorkItem(job.color, job.depth, req.score_threshold, req.mask_format, req.request_id, req.protocol,
                    req.received_at, req.dispatched_at, req.decode_us, tuple(req.outputs), req.model_version,
                    OutputRegions.from_request(req.output_regions))


def _may_pass(exc: BaseException) -> bool:
    """Load failures worth a restart: out of device memory (another process may free it). Every other
    one (a missing or unreadable file, wrong format, wrong shapes, a bad option) fails the same again."""
    text = str(exc).lower()
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text or "can't allocate memory" in text


def _send(send: "Send", job: Job, code: str, message: str) -> None:
    send(job.identity, [messages.REPLY, _reply(job.req.id, code, message)])


def _color(ring: ShmRing, slot: int, ref: messages.ArrayRef) -> np.ndarray | EncodedImage:
    """The color image: pixels, or a JPEG's compressed bytes (a view of the slot, no copy) that the
    engine or the core decodes (ServerConfig.jpeg_decode)."""
    if ref.encoding == "jpeg":
        if len(ref.shape) != 3 or ref.shape[2] != 3 or min(ref.shape) < 1 or ref.dtype != "uint8":
            raise ValueError(f"a JPEG color must decode to [H, W, 3] uint8, got {list(ref.shape)} {ref.dtype}")
        return EncodedImage(ring.array(slot, int(ref.offset), (int(ref.nbytes),), "uint8"), int(ref.shape[0]),
                            int(ref.shape[1]))
    return _view(ring, slot, ref)


def _depth(ring: ShmRing, slot: int, ref: messages.ArrayRef) -> np.ndarray | PngRows:
    """The depth image: pixels, or a 16-bit PNG's filtered rows (a view of the slot, no copy) that the engine
    or the core reconstructs."""
    if ref.encoding == PNG_ROWS:
        if len(ref.shape) != 2 or min(ref.shape) < 1 or ref.dtype != "uint16":
            raise ValueError(f"PNG rows must reconstruct to [H, W] uint16, got {list(ref.shape)} {ref.dtype}")
        h, w = int(ref.shape[0]), int(ref.shape[1])
        if int(ref.nbytes) != rows_nbytes(h, w):
            raise ValueError(f"PNG rows of a {w}x{h} image are {rows_nbytes(h, w)} bytes, not {ref.nbytes}")
        return PngRows(ring.array(slot, int(ref.offset), (h, 1 + 2 * w), "uint8"), h, w)
    return _view(ring, slot, ref)


def _view(ring: ShmRing, slot: int, ref: messages.ArrayRef) -> np.ndarray:
    if ref.encoding:
        raise ValueError(f"encoding {ref.encoding!r} is not known here (raw; jpeg for the color, png_rows for "
                         "the depth)")
    if ref.dtype not in _ALLOWED_DTYPES:
        raise ValueError(f"dtype {ref.dtype!r} not allowed")
    return ring.array(slot, int(ref.offset), tuple(int(s) for s in ref.shape), ref.dtype)


def _reply(request_id: int, code: str, message: str) -> bytes:
    return messages.InferReply(id=request_id, code=code, message=message).SerializeToString()
