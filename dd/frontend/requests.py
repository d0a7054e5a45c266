"""The request path, protocol-free: admission, model, slot, decode, dispatch.

Every protocol adapter (dd/frontend/protocols/) calls `RequestPath.run` with a
DetectionRequest and gets the worker's serialized response (an Outcome, with the
worker's timings from the reply envelope) or a ServeError carrying a Status; it
never sees a slot, a worker or the ring, and this module never sees gRPC or a proto.

Every request is bounded: at most max_pending are admitted at once (more are
refused with RESOURCE_EXHAUSTED right away), each waits for a ring slot and a
worker credit only until shortly before its deadline. Finished responses that an
adapter holds for a client that does not read them count too (`hold`/`release`):
in max_pending, and in bytes against max_held_response_mb.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from dd.config import ModelConfig, ServerConfig
from dd.frontend.decode import check_options, decode_into_slot
from dd.frontend.errors import ServeError, Status
from dd.frontend.inputs import HOPS, DetectionRequest, Outcome, Timings
from dd.ipc import messages
from dd.logsafe import clip
from dd.procutil import name_os_thread

if TYPE_CHECKING:
    from dd.frontend.dispatcher import Dispatcher, Reply
    from dd.frontend.slots import SlotPool
    from dd.ipc.shm_ring import ShmRing

# A request that cannot get a slot or a worker gives up this long before its deadline (at most a
# tenth of its timeout), so that the client gets RESOURCE_EXHAUSTED and the reason, not a bare
# DEADLINE_EXCEEDED from its own timer.
GIVE_UP_MARGIN_S = 0.2


class RequestPath:
    """What the adapters call. Built by the frontend's lifecycle (dd.frontend.server) once the ring,
    the slots and the dispatcher exist; `stopping` is set when the frontend begins to shut down."""

    def __init__(self, models: dict[str, ModelConfig], default_model: str, cfg: ServerConfig,
                 ring: "ShmRing", slots: "SlotPool", dispatcher: "Dispatcher",
                 pool: ThreadPoolExecutor | None = None) -> None:
        self.models = models
        self.default_model = default_model
        self.cfg = cfg
        self.ring = ring
        self.slots = slots
        self.dispatcher = dispatcher
        self.pool = pool or ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)),
                                               thread_name_prefix="decode", initializer=name_os_thread)
        self.stopping = False
        self.pending = 0  # requests admitted and not finished, plus finished responses adapters hold
        self.held_bytes = 0  # bytes of finished responses that adapters hold for their clients

    # -- what adapters hold ----------------------------------------------------------------
    def hold(self, body: bytes) -> None:
        """A finished response waits for its client (a stream that has not written it yet): it counts
        like a request in flight, so that clients that do not read cannot make the frontend hold
        responses that no limit sees. `release` once it is written or dropped."""
        self.pending += 1
        self.held_bytes += len(body)

    def release(self, body: bytes) -> None:
        self.pending -= 1
        self.held_bytes -= len(body)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- the path --------------------------------------------------------------------------
    def resolve_model(self, name: str) -> ModelConfig:
        name = name or self.default_model
        model = self.models.get(name)
        if model is None:
            raise ServeError(Status.NOT_FOUND,
                             f"model {clip(name)} is not served here; served: {', '.join(sorted(self.models))}")
        return model

    def _jpeg_to_worker(self, model: str) -> bool:
        """ServerConfig.jpeg_decode for this request: send a JPEG color compressed, for the worker to decode."""
        policy = self.cfg.jpeg_decode
        return policy == "worker" or (policy == "auto" and self.dispatcher.decodes_jpeg_on_gpu(model))

    async def run(self, request: DetectionRequest, time_remaining: float | None,
                  owner: object | None = None) -> Outcome:
        """Admission, then the request served. `time_remaining`: seconds to the caller's deadline (None:
        default_timeout_s). `owner`: whoever shares the slot pool fairly (a stream), or None.

        Admission refuses at once when this frontend already holds max_pending requests (or finished
        responses), or max_held_response_mb of responses its clients do not read.

        Metrics: every request that fails is counted here, once, wherever it failed (its model's name,
        or "" for a name not served, so that clients cannot mint label values); an answered one is
        counted by the dispatcher when the worker's reply arrives, with the envelope's timings."""
        try:
            return await self._admit(request, time_remaining, owner)
        except BaseException as exc:
            self.count_failure(request.model, exc)
            raise

    def count_failure(self, model: str, exc: BaseException) -> None:
        """Counts a failed request (metrics) under its model's name, or "" for a name not served (clients
        cannot mint label values). `run` counts its own; an adapter calls this for a request it refuses
        before calling `run` (an input its protocol does not allow), so that it counts too, once."""
        name = model or self.default_model
        self.dispatcher.record_failure(name if name in self.models else "", exc)

    async def _admit(self, request: DetectionRequest, time_remaining: float | None,
                     owner: object | None) -> Outcome:
        rid_bytes = len(request.request_id.encode())
        if rid_bytes > self.cfg.max_request_id_bytes:
            raise ServeError(Status.INVALID_ARGUMENT,
                             f"request_id is {rid_bytes} bytes; at most {self.cfg.max_request_id_bytes} "
                             "(max_request_id_bytes)")
        if self.stopping:
            raise ServeError(Status.UNAVAILABLE, "server is shutting down; retry on another replica")
        if self.pending >= self.cfg.max_pending:
            raise ServeError(Status.RESOURCE_EXHAUSTED,
                             f"server overloaded: {self.pending} requests already pending on this frontend "
                             f"(max_pending); retry with backoff")
        if self.held_bytes > self.cfg.max_held_response_mb * 2**20:
            raise ServeError(Status.RESOURCE_EXHAUSTED,
                             f"server overloaded: {self.held_bytes / 2**20:.0f} MiB of finished responses wait "
                             "for streams that do not read them (max_held_response_mb); retry with backoff")
        self.pending += 1
        try:
            return await self._serve(request, time_remaining, owner)
        finally:
            self.pending -= 1

    async def _serve(self, request: DetectionRequest, time_remaining: float | None,
                     owner: object | None) -> Outcome:
        received = time.time()
        timeout = self.cfg.default_timeout_s if time_remaining is None else min(time_remaining, 24 * 3600.0)
        deadline = received + timeout
        give_up_at = deadline - min(GIVE_UP_MARGIN_S, 0.1 * max(timeout, 0.0))
        model = self.resolve_model(request.model)
        check_options(request.score_threshold, request.mask_format)
        if self.dispatcher.ready_workers(model.name) == 0 and (error := self.dispatcher.model_error(model.name)):
            raise ServeError(Status.UNAVAILABLE, f"model {model.name!r} failed to load: {error}")
        got = await self.slots.acquire(give_up_at, owner)
        if got is None:
            raise ServeError(Status.RESOURCE_EXHAUSTED,
                             f"all {self.ring.slots} shared-memory slots of this frontend stayed busy until the "
                             "deadline; retry later, or the operator can raise --ring-slots or add frontends")
        slot, gen = got
        work = None
        abandoned = threading.Event()  # set when nobody waits for this request: its decodes do not start
        try:
            t0 = time.perf_counter()
            work = self.pool.submit(decode_into_slot, request.color, request.depth, model.input_kind == "rgbd",
                                    self.ring.slot_buffer(slot), self.cfg.max_image_pixels,
                                    max_jpeg_scans=self.cfg.max_jpeg_scans, resize=(model.min_size, model.max_size),
                                    abandoned=abandoned, jpeg_to_worker=self._jpeg_to_worker(model.name),
                                    png_rows_to_worker=self.dispatcher.unfilters_png_rows_on_gpu(model.name))
            decoded = await asyncio.wrap_future(work)
            decode_us = int((time.perf_counter() - t0) * 1e6)
            decoded_at = time.time()
            req = messages.InferRequest(
                id=self.dispatcher.next_id(), ring=self.ring.name, slot=slot, generation=gen,
                color=messages.ArrayRef(offset=decoded.color.offset, shape=decoded.color.shape,
                                        dtype=decoded.color.dtype, encoding=decoded.color.encoding,
                                        nbytes=decoded.color.nbytes),
                has_depth=decoded.depth is not None, score_threshold=request.score_threshold,
                mask_format=request.mask_format, deadline=deadline, received_at=received,
                decode_us=decode_us, request_id=request.request_id, model=model.name, protocol=request.protocol,
                outputs=request.outputs, model_version=request.model_version)
            for region in request.output_regions:
                req.output_regions.add(output=region.output, shm_key=region.shm_key, offset=region.offset,
                                       byte_size=region.byte_size)
            if decoded.depth is not None:
                req.depth.CopyFrom(messages.ArrayRef(offset=decoded.depth.offset, shape=decoded.depth.shape,
                                                     dtype=decoded.depth.dtype, encoding=decoded.depth.encoding,
                                                     nbytes=decoded.depth.nbytes))
            reply = await self.dispatcher.submit_reply(req, deadline, rebind=lambda: self.ring.bump(slot),
                                                       give_up_at=give_up_at)
            stamps = _stamps(received, decoded_at, req, reply) if request.trace else None
            return Outcome(reply.body, _timings(reply.envelope), stamps)
        finally:
            abandoned.set()
            # Not before the decode thread is done with the slot, even when this task was cancelled.
            self.slots.release_after(slot, work)


def _stamps(received: float, decoded: float, req: messages.InferRequest, reply: "Reply") -> dict[str, float]:
    """A traced request's hops (inputs.HOPS); the worker's from its reply envelope (0 if it has none)."""
    env = reply.envelope or messages.InferReply()
    return dict(zip(HOPS, (received, decoded, req.dispatched_at, env.accepted_at, env.batch_started_at,
                           env.replied_at, reply.arrived_at)))


def _timings(envelope: messages.InferReply | None) -> Timings:
    if envelope is None:
        return Timings()
    return Timings(queue_us=envelope.queue_us, decode_us=envelope.decode_us, inference_us=envelope.inference_us,
                   encode_us=envelope.encode_us, batch_size=envelope.batch_size)
