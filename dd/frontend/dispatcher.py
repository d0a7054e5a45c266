"""Dispatch to workers: least-loaded with credits, liveness by ping and socket events, one retry.

One ZeroMQ DEALER per worker socket, so the frontend (not ZeroMQ's round
robin) decides where each request goes: to the ready worker of the model with
the fewest requests in flight from this frontend, and never past its credit
limit (Mask R-CNN times vary with the image, so round robin would queue behind
slow ones). Workers are found by listing the run directory, so they may come
and go and be started by anything. Replies come back on one socket of the
frontend's own (a PULL in the run directory, named in every ping), to which
each worker's inference thread sends them itself; a worker that is not
connected to it yet answers through the DEALER the request went out on.

A worker is declared dead when its socket disconnects (a killed process: at
once) or it misses pings for DEAD_AFTER_S (a hung or stopped one), or when it
answers with a new incarnation. Its requests in flight are retried once on
another worker of the model (after bumping the slot's generation so the dead
worker's leftovers can never be taken for an answer), otherwise they fail with
UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from dd.frontend.errors import ServeError, Status
from dd.frontend.loop_socket import LoopSocket
from dd.ipc import endpoints, messages
from dd.metrics import Recorder

log = logging.getLogger("dd.frontend.dispatch")

PING_INTERVAL_S = 0.2
# Pings are answered by the worker's I/O thread, never behind inference, so silence this long
# means hung or stopped (SIGSTOP, swapping), not busy. Long enough not to fire on a loaded host.
DEAD_AFTER_S = 2.0
DISCOVERY_INTERVAL_S = 0.5
# While a model this frontend serves has no worker socket yet (at start: the workers bind theirs after
# the zygote's imports), the run directory is listed this often, so that a worker is found within this
# and not within DISCOVERY_INTERVAL_S of binding. A listing of a small directory: microseconds.
WAITING_DISCOVERY_INTERVAL_S = 0.02
# A reply is 1 KB to 1 MB: a receive buffer that holds a whole one lets the worker write it at once
# (the kernel caps this at net.core.rmem_max).
REPLY_RCVBUF_BYTES = 2 * 1024 * 1024


@dataclass
class Reply:
    code: str
    message: str
    body: bytes | None
    envelope: messages.InferReply | None = None  # the worker's timings, for the metrics
    arrived_at: float = 0.0  # time.time() when this frontend read it (a traced request's hops)


_WORKER_DIED = Reply("WORKER_DIED", "", None)


@dataclass
class WorkerLink:
    model: str
    index: int
    path: Path
    sock: LoopSocket
    max_inflight: int
    inflight: dict[int, asyncio.Future] = field(default_factory=dict)
    incarnation: str = ""
    ready: bool = False
    connected: bool = False
    last_pong: float = 0.0
    error: str = ""
    engine: str = ""
    device: str = ""
    gpu_jpeg: bool = False  # its engine decodes JPEGs on a GPU (Pong.gpu_jpeg)
    gpu_png_rows: bool = False  # its engine reconstructs 16-bit PNG depth rows on a GPU (Pong.gpu_png_rows)
    # Its socket's event monitor (connected, disconnected); closed with the link, else the context's
    # term() would wait for it for ever.
    monitor: LoopSocket | None = None

    @property
    def name(self) -> str:
        return f"{self.model}.{self.index}"

    @property
    def usable(self) -> bool:
        return self.ready and self.connected and len(self.inflight) < self.max_inflight


class Dispatcher:
    def __init__(self, run_dir: Path, max_inflight: Callable[[str], int],
                 on_change: Callable[[], None] | None = None, recorder: Recorder | None = None,
                 models: tuple[str, ...] = (), ring: str = "") -> None:
        self.run_dir = run_dir
        self.ring = ring  # this frontend's input ring, named in pings so workers prepare it before its first request
        self.models = models  # the models this frontend serves: looked for often until each has a worker
        self.recorder = recorder or Recorder()
        self._max_inflight = max_inflight
        self._on_change = on_change or (lambda: None)
        self.ctx = zmq.Context()
        self.identity = f"fe-{os.getpid()}".encode()
        self.reply_path = endpoints.frontend_reply_socket(run_dir, self.identity)
        self._replies: LoopSocket | None = None
        self._reply_to = ""  # the reply socket's address named in pings, once it is bound
        self.links: dict[Path, WorkerLink] = {}
        self._by_name: dict[bytes, WorkerLink] = {}  # a link by its worker's name (a direct reply's first frame)
        self.direct_replies = 0  # replies that came on the reply socket (the others came through the DEALERs)
        # Requests waiting for a credit: plain futures, woken synchronously. Not an asyncio.Condition:
        # wait_for(cond.wait()) cancelled at the wrong moment (a client cancel, a deadline) leaves the
        # condition's lock released twice or held forever, after which every request of this
        # frontend blocks on the lock until its deadline (seen in scripts/soak.py).
        # Requests waiting for a credit, per model, oldest first.
        self._waiters: collections.defaultdict[str, collections.deque[asyncio.Future]] = \
            collections.defaultdict(collections.deque)
        self._tasks: list[asyncio.Task] = []
        self._ids = itertools.count(1)
        self._rr = itertools.count()
        self._closing = False

    def next_id(self) -> int:
        return next(self._ids)

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        if self.reply_path is not None:
            replies = self.ctx.socket(zmq.PULL)
            replies.setsockopt(zmq.LINGER, 0)
            replies.setsockopt(zmq.RCVHWM, 10_000)  # the credits bound the replies
            replies.setsockopt(zmq.RCVBUF, REPLY_RCVBUF_BYTES)
            self.reply_path.unlink(missing_ok=True)  # a previous frontend's of this pid
            replies.bind(endpoints.ipc_address(self.reply_path))
            os.chmod(self.reply_path, 0o600)
            self._replies = LoopSocket(replies, self._on_reply)
            self._reply_to = endpoints.ipc_address(self.reply_path)
        else:
            log.info("the run directory %s is too long a path for this frontend's reply socket: replies come "
                     "through the workers' sockets (a shorter --run-dir saves each about 0.2 ms)", self.run_dir)
        self._discover()
        self._tasks.append(asyncio.create_task(self._discovery_loop(), name="discovery"))
        self._tasks.append(asyncio.create_task(self._ping_loop(), name="ping"))

    async def close(self) -> None:
        self._closing = True
        for t in self._tasks:
            t.cancel()
        for link in self.links.values():
            for fut in link.inflight.values():
                if not fut.done():
                    fut.set_result(Reply("UNAVAILABLE", "frontend is shutting down", None))
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for link in self.links.values():
            link.sock.close()
            if link.monitor is not None:
                link.monitor.close()
        if self._replies is not None:
            self._replies.close()
            self.reply_path.unlink(missing_ok=True)  # type: ignore[union-attr] - bound, so not None
        self.ctx.term()

    # -- state queries ---------------------------------------------------------------------
    def ready_workers(self, model: str) -> int:
        return sum(1 for l in self.links.values() if l.model == model and l.ready and l.connected)

    def engines(self, model: str) -> set[str]:
        """The engines the model's ready workers run (after any fallback)."""
        return {l.engine for l in self.links.values() if l.model == model and l.ready and l.connected and l.engine}

    def decodes_jpeg_on_gpu(self, model: str) -> bool:
        """Whether every ready worker of the model (at least one) decodes JPEGs on a GPU: jpeg_decode "auto"
        then sends them compressed. A retry may land on any of them, so all must."""
        return self._every_ready_worker(model, lambda link: link.gpu_jpeg)

    def unfilters_png_rows_on_gpu(self, model: str) -> bool:
        """Whether every ready worker of the model (at least one) reconstructs 16-bit PNG depth rows on a GPU:
        depth PNGs then go to it as their inflated rows. Any worker would serve them (its core reconstructs
        them on the CPU), but only one that does it on a GPU saves host CPU."""
        return self._every_ready_worker(model, lambda link: link.gpu_png_rows)

    def _every_ready_worker(self, model: str, says: Callable[[WorkerLink], bool]) -> bool:
        """At least one worker of the model is ready, and every ready one says so (its last pong)."""
        ready = [l for l in self.links.values() if l.model == model and l.ready and l.connected]
        return bool(ready) and all(says(l) for l in ready)

    def model_error(self, model: str) -> str:
        """Why a model's workers are not ready, if they said (a load failure)."""
        errors = [l.error for l in self.links.values() if l.model == model and l.error]
        return errors[0] if errors else ""

    # -- discovery and liveness ------------------------------------------------------------
    def _discover(self) -> None:
        for model, index, path in endpoints.list_worker_sockets(self.run_dir):
            if path not in self.links:
                self._connect(model, index, path)

    def _connect(self, model: str, index: int, path: Path) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue requests for a worker that is not there
        # Credits bound the requests; the high-water marks bound pings to a worker that stopped reading.
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sock.connect(endpoints.ipc_address(path))
        # The callbacks run from the loop, once `link` is bound.
        link = WorkerLink(model, index, path, LoopSocket(sock, lambda frames: self._on_link_frames(link, frames)),
                          self._max_inflight(model),
                          monitor=LoopSocket(monitor, lambda frames: self._on_monitor_event(link, frames)))
        self._by_name[link.name.encode()] = link
        self.links[path] = link
        log.info("found worker %s at %s", link.name, path)

    async def _discovery_loop(self) -> None:
        while True:
            await asyncio.sleep(self.next_discovery_s())
            self._discover()

    def next_discovery_s(self) -> float:
        """How long until the run directory is listed again: briefly while a model this frontend serves
        has no worker socket yet, DISCOVERY_INTERVAL_S once each has one."""
        found = {link.model for link in self.links.values()}
        waiting = any(m not in found for m in self.models)
        return WAITING_DISCOVERY_INTERVAL_S if waiting else DISCOVERY_INTERVAL_S

    async def _ping_loop(self) -> None:
        while True:
            now = time.time()
            ping = self._ping(now)
            for link in list(self.links.values()):
                if link.connected:
                    try:
                        link.sock.send([messages.PING, ping])
                    except zmq.Again:
                        pass
                if link.ready and now - link.last_pong > DEAD_AFTER_S:
                    self._lost(link, f"no answer to pings for {DEAD_AFTER_S:.0f} s")
            await asyncio.sleep(PING_INTERVAL_S)

    def _ping(self, now: float) -> bytes:
        return messages.Ping(sent_at=now, ring=self.ring, reply_to=self._reply_to).SerializeToString()

    def _on_monitor_event(self, link: WorkerLink, frames: list[bytes]) -> None:
        event = parse_monitor_message(frames)
        if event["event"] == zmq.EVENT_CONNECTED:
            link.connected = True
            link.last_pong = time.time()
            try:
                link.sock.send([messages.PING, self._ping(time.time())])
            except zmq.Again:  # gone again at once: its DISCONNECTED follows; the ping loop retries
                pass
        elif event["event"] == zmq.EVENT_DISCONNECTED:
            link.connected = False
            self._lost(link, "its socket closed")

    def _lost(self, link: WorkerLink, why: str) -> None:
        """The worker behind `link` is gone: hand its requests back to their callers for a retry."""
        was_ready = link.ready
        link.ready = False
        link.incarnation = ""
        if link.inflight or was_ready:
            log.warning("worker %s lost (%s); %d request(s) in flight go back for retry",
                        link.name, why, len(link.inflight))
        for fut in link.inflight.values():
            if not fut.done():
                fut.set_result(_WORKER_DIED)
        link.inflight.clear()
        self._changed_soon()

    def _on_link_frames(self, link: WorkerLink, frames: list[bytes]) -> None:
        """A message on a worker's own socket: a pong, or a reply that did not come the direct way."""
        try:
            self._on_message(link, frames)
        except Exception:  # noqa: BLE001 - a malformed frame must not stop the reading
            log.exception("bad message from worker %s (%d frame(s)); ignored", link.name, len(frames))

    def _on_reply(self, frames: list[bytes]) -> None:
        """A reply a worker sent to this frontend's reply socket: [worker name, R, envelope, body]."""
        link = self._by_name.get(frames[0]) if frames else None
        if link is None:
            log.warning("a reply from an unknown worker %r on the reply socket; dropped", frames[:1])
            return
        self.direct_replies += 1
        self._on_link_frames(link, frames[1:])

    def _on_message(self, link: WorkerLink, frames: list[bytes]) -> None:
        if len(frames) < 2:
            raise ValueError("expected a kind and a payload frame")
        kind = frames[0]
        if kind == messages.REPLY:
            rep = messages.InferReply.FromString(frames[1])
            fut = link.inflight.pop(rep.id, None)
            if fut is not None and not fut.done():
                fut.set_result(Reply(rep.code, rep.message, frames[2] if len(frames) > 2 else None, rep,
                                     time.time()))
            self._credit_freed(link.model)
        elif kind == messages.PONG:
            pong = messages.Pong.FromString(frames[1])
            if link.incarnation and pong.incarnation != link.incarnation:
                self._lost(link, "it restarted")
            changed = link.ready != pong.ready or link.error != pong.error
            link.incarnation = pong.incarnation
            link.ready = pong.ready
            link.error = pong.error
            link.engine = pong.engine
            link.device = pong.device
            link.gpu_jpeg = pong.gpu_jpeg
            link.gpu_png_rows = pong.gpu_png_rows
            link.last_pong = time.time()
            if changed:
                # A load failure's reason is the worker's (or its supervisor's) to log, once.
                log.info("worker %s %s", link.name, "ready" if pong.ready
                         else "failed to load its model" if pong.error else "not ready")
                self._changed_soon()

    def _changed_soon(self) -> None:
        """A worker's state changed (ready, lost): every waiter looks again, and health is updated."""
        waiters, self._waiters = self._waiters, collections.defaultdict(collections.deque)
        for queue in waiters.values():
            for fut in queue:
                if not fut.done():
                    fut.set_result(None)
        self._on_change()

    def _credit_freed(self, model: str) -> None:
        """One credit of `model` came back: its oldest waiter looks again (the others would find it
        taken). Once per request, so no health update and no herd."""
        queue = self._waiters.get(model)
        while queue:
            fut = queue.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def record_failure(self, model: str, exc: BaseException) -> None:
        """Counts a failed request (metrics), by the status it failed with: a ServeError's, CANCELLED for
        a call cancelled (client gone, stream ended), INTERNAL for anything else. The request path calls
        this once per request, wherever it failed (admission, decode, waiting for a worker, the worker)."""
        if not self.recorder.enabled:
            return
        status = (exc.status.value if isinstance(exc, ServeError) else
                  Status.CANCELLED.value if isinstance(exc, asyncio.CancelledError) else Status.INTERNAL.value)
        self.recorder.record_request(model, False, 0.0, status=status)

    def _record(self, req: messages.InferRequest, rep: messages.InferReply | None) -> None:
        """Counts an answered request with the worker's timings from the reply envelope (not the body)."""
        if rep is None or not self.recorder.enabled:
            return
        self.recorder.record_request(req.model, True, max(0.0, (time.time() - req.received_at) * 1e6),
                                     queue_us=rep.queue_us, input_us=rep.decode_us, infer_us=rep.inference_us,
                                     output_us=rep.encode_us)

    # -- dispatch -------------------------------------------------------------------------
    def _pick(self, model: str) -> WorkerLink | None:
        best: WorkerLink | None = None
        candidates = [l for l in self.links.values() if l.model == model and l.usable]
        if not candidates:
            return None
        # Fewest in flight wins; rotate the start so ties spread evenly.
        start = next(self._rr) % len(candidates)
        for l in candidates[start:] + candidates[:start]:
            if best is None or len(l.inflight) < len(best.inflight):
                best = l
        return best

    async def _acquire(self, model: str, deadline: float) -> WorkerLink:
        loop = asyncio.get_running_loop()
        while True:
            link = self._pick(model)
            if link is not None:
                return link
            left = deadline - time.time()
            if left <= 0 or self._closing:
                break
            err = self.model_error(model)
            if err and self.ready_workers(model) == 0:
                raise ServeError(Status.UNAVAILABLE,
                                    f"model {model!r} has no ready worker: it failed to load ({err})")
            fut = loop.create_future()
            queue = self._waiters[model]
            queue.append(fut)
            try:
                # asyncio.wait never cancels fut; the periodic look also covers a wake that was missed.
                await asyncio.wait((fut,), timeout=min(left, 0.25))
            except BaseException:
                if fut.done():  # woken for a credit it will not take: pass it on
                    self._credit_freed(model)
                raise
            finally:
                if not fut.done():
                    fut.cancel()
                    try:
                        queue.remove(fut)
                    except ValueError:  # the queues were swapped out by a state change
                        pass
        if self.ready_workers(model) == 0:
            raise ServeError(Status.UNAVAILABLE,
                                f"no worker of model {model!r} is ready (starting, restarting or stopped)")
        raise ServeError(Status.RESOURCE_EXHAUSTED,
                            f"every worker of model {model!r} is busy and none freed up before the deadline")

    async def submit(self, req: messages.InferRequest, deadline: float,
                     rebind: Callable[[], int], give_up_at: float | None = None) -> bytes:
        """The worker's serialized response alone: see submit_reply."""
        return (await self.submit_reply(req, deadline, rebind, give_up_at)).body

    async def submit_reply(self, req: messages.InferRequest, deadline: float,
                           rebind: Callable[[], int], give_up_at: float | None = None) -> Reply:
        """Sends the request to a worker and waits for its reply: the serialized response and the
        envelope with the worker's timings (so callers count them without parsing the body).

        Waits for a worker credit until `give_up_at` (default: the deadline),
        then for the answer until the deadline. `rebind` bumps the slot's
        generation before a retry and returns the new one, so the dead worker's
        copy of the request is void.
        """
        self.recorder.record_decode(req.model, req.decode_us)
        attempts = 0
        while True:
            link = await self._acquire(req.model, give_up_at or deadline)
            if time.time() >= deadline:
                raise ServeError(Status.DEADLINE_EXCEEDED,
                                    "deadline exceeded before a worker could take the request")
            fut: asyncio.Future = asyncio.get_running_loop().create_future()
            link.inflight[req.id] = fut
            req.dispatched_at = time.time()
            try:
                link.sock.send([messages.INFER, req.SerializeToString()])
            except zmq.Again:  # never sent: not an attempt
                link.inflight.pop(req.id, None)
                link.connected = False
                continue
            attempts += 1
            try:
                reply = await asyncio.wait_for(fut, timeout=max(0.0, deadline - time.time()))
            except asyncio.TimeoutError:
                raise ServeError(Status.DEADLINE_EXCEEDED,
                                    f"deadline exceeded waiting for worker {link.name}") from None
            finally:
                if link.inflight.get(req.id) is fut:
                    del link.inflight[req.id]
                    self._credit_freed(link.model)
            if reply is _WORKER_DIED:
                if attempts >= 2:
                    raise ServeError(Status.UNAVAILABLE,
                                        f"worker {link.name} died while serving this request, after one retry")
                req.generation = rebind()
                continue
            if reply.code == "OK" and reply.body is not None:
                self._record(req, reply.envelope)
                return reply
            raise ServeError(Status.from_name(reply.code), reply.message or reply.code)
