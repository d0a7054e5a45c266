"""The frontend process: a grpc.aio server in front of the workers.

Stateless but for the requests in flight: it validates, decodes into its own
shared-memory ring, sends a control message to a worker and hands the worker's
serialized response to gRPC as it is (a pass-through serializer), so it never
parses or re-encodes results. Several frontends may share one port
(SO_REUSEPORT), each with its own ring, so decoding scales over cores.

Every request is bounded: at most max_pending are admitted at once (more are
refused with RESOURCE_EXHAUSTED right away), each waits for a ring slot and a
worker credit only until shortly before its deadline, and a request that fails
in an unexpected way gets INTERNAL with a message rather than taking anything
else down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import AsyncIterator, Callable, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dd.config import ModelConfig, ServerConfig, default_model_name
from dd.frontend.auth import TokenAuth, read_token, server_credentials
from dd.frontend.decode import RequestError, check_options, decode_into_slot
from dd.frontend.dispatcher import DispatchError, Dispatcher
from dd.frontend.slots import SlotPool
from dd.ipc import endpoints, messages
from dd.ipc.shm_ring import ShmRing, remove_stale_segments, segment_name
from dd.procutil import die_with_parent, parent_alive
from dd.proto.deep_detection.v1 import detector_pb2 as pb

log = logging.getLogger("dd.frontend")

SERVICE = "deep_detection.v1.Detector"
STREAM_WINDOW = 32  # requests of one DetectStream in flight at once
# A request that cannot get a slot or a worker gives up this long before its deadline (at most a
# tenth of its timeout), so that the client gets RESOURCE_EXHAUSTED and the reason, not a bare
# DEADLINE_EXCEEDED from its own timer.
GIVE_UP_MARGIN_S = 0.2
ORPHAN_GRACE_S = 1.0  # the supervisor is gone, and with it the workers: no point waiting longer
_END = object()


def _passthrough(body: bytes) -> bytes:
    return body


class CorruptMessage:
    """Stands in for a request whose bytes are no valid protobuf, so the handler can answer
    INVALID_ARGUMENT with a reason instead of gRPC answering UNKNOWN (and logging a traceback)."""

    def __init__(self, kind: str, error: Exception) -> None:
        self.message = f"the request is not a valid {kind} protobuf message ({error})"


def _parser(cls: type) -> Callable[[bytes], object]:
    def parse(data: bytes) -> object:
        try:
            return cls.FromString(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and friends
            return CorruptMessage(cls.DESCRIPTOR.full_name, exc)
    return parse


class Frontend:
    def __init__(self, models: list[ModelConfig], server: ServerConfig, run_dir: Path,
                 parent_pid: int | None = None) -> None:
        self.models = {m.name: m for m in models}
        self.default_model = default_model_name(models)
        self.cfg = server
        self.run_dir = run_dir
        self.parent_pid = parent_pid
        self.tag = endpoints.run_tag(run_dir)
        self.ring: ShmRing | None = None
        self.slots: SlotPool | None = None
        self.dispatcher: Dispatcher | None = None
        self.health = health.aio.HealthServicer()
        self._pending = 0
        self._pool = ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)),
                                        thread_name_prefix="decode")
        self._stopping = False

    # -- setup -----------------------------------------------------------------------------
    def _max_inflight(self, model: str) -> int:
        if self.cfg.max_inflight_per_worker > 0:
            return self.cfg.max_inflight_per_worker
        return 2 * self.models[model].max_batch_size if model in self.models else 2

    async def serve(self) -> int:
        # Linux sends SIGTERM if the supervisor dies, even while this loop is busy; the watch below
        # is the fallback where prctl is not available.
        die_with_parent(self.parent_pid)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        if self.parent_pid:
            # Ctrl-C in a terminal signals the whole process group; the supervisor then stops the
            # frontends first and the workers after them, so that requests in flight finish.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        else:
            loop.add_signal_handler(signal.SIGINT, stop.set)
        interceptors = [TokenAuth(read_token(self.cfg.auth_token_file))] if self.cfg.auth_token_file else []
        remove_stale_segments(self.tag, only_dead=True)
        self.ring = ShmRing.create(segment_name(self.tag, "fe"), self.cfg.ring_slots, self.cfg.slot_bytes())
        self.slots = SlotPool(self.ring)
        self.dispatcher = Dispatcher(self.run_dir, self._max_inflight, on_change=self._update_health)
        server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", int(self.cfg.max_message_mb * 2**20)),
            ("grpc.max_send_message_length", int(self.cfg.max_message_mb * 2**20)),
            ("grpc.so_reuseport", 1),
        ])
        server.add_generic_rpc_handlers((self._handlers(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
        address = f"{self.cfg.host}:{self.cfg.port}"
        creds = server_credentials(self.cfg)
        port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
        if port == 0:
            raise RuntimeError(f"cannot listen on {address}")
        await self.dispatcher.start()
        await server.start()
        self._update_health()
        security = ("mutual TLS" if self.cfg.tls_client_ca else "TLS" if creds else "plaintext") + \
            (", bearer token" if interceptors else ", no authentication")
        log.info("frontend pid %d serving %s on %s, %s (ring %s: %d slots of %.1f MiB)", os.getpid(),
                 ", ".join(self.models), address, security, self.ring.name, self.ring.slots,
                 self.ring.slot_bytes / 2**20)

        grace = self.cfg.grace_s
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=0.5)
            except asyncio.TimeoutError:
                pass
            if not parent_alive(self.parent_pid):
                break
        if not parent_alive(self.parent_pid):  # also when PR_SET_PDEATHSIG's SIGTERM woke us
            log.warning("supervisor is gone; frontend exits")
            grace = min(grace, ORPHAN_GRACE_S)
        self._stopping = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("frontend stopping: finishing %d request(s) in flight (grace %.0f s)",
                 self._pending, grace)
        await server.stop(grace)
        await self.dispatcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.ring.close()
        self.ring.unlink()
        log.info("frontend stopped")
        return 0

    # -- health ----------------------------------------------------------------------------
    def _update_health(self) -> None:
        """SERVING once every model has a ready worker, leaving out models that failed to load (they
        will not come up by waiting, and must not keep the others out of a load balancer's rotation;
        ListModels says why). Each model also has its own entry: Check(service=MODEL_NAME)."""
        if self.dispatcher is None or self._stopping:
            return
        ready = {m: self.dispatcher.ready_workers(m) > 0 for m in self.models}
        failed = {m for m in self.models if not ready[m] and self.dispatcher.model_error(m)}
        ok = any(ready.values()) and all(ready[m] for m in self.models if m not in failed)
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        per_model = {m: serving if ready[m] else not_serving for m in self.models}
        asyncio.get_running_loop().create_task(self._set_health(serving if ok else not_serving, per_model))

    async def _set_health(self, status: int, per_model: dict[str, int] | None = None) -> None:
        for name in ("", SERVICE):
            await self.health.set(name, status)
        for name in self.models:
            await self.health.set(name, status if per_model is None else per_model[name])

    # -- handlers ----------------------------------------------------------------------------
    def _handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Detect": grpc.unary_unary_rpc_method_handler(
                self.detect, request_deserializer=_parser(pb.DetectRequest), response_serializer=_passthrough),
            "DetectStream": grpc.stream_stream_rpc_method_handler(
                self.detect_stream, request_deserializer=_parser(pb.DetectRequest),
                response_serializer=_passthrough),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                self.list_models, request_deserializer=_parser(pb.ListModelsRequest),
                response_serializer=pb.ListModelsResponse.SerializeToString),
        })

    async def list_models(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        if isinstance(request, CorruptMessage):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, request.message)
        resp = pb.ListModelsResponse()
        for name, m in self.models.items():
            n = self.dispatcher.ready_workers(name) if self.dispatcher else 0
            running = self.dispatcher.engines(name) if self.dispatcher else set()
            resp.models.add(name=name, input_kind=m.input_kind, categories=list(m.categories),
                            engine=",".join(sorted(running)) or m.engine,
                            ready=n > 0, max_batch_size=m.max_batch_size, ready_workers=n,
                            is_default=name == self.default_model,
                            error=self.dispatcher.model_error(name) if self.dispatcher else "")
        return resp

    async def detect(self, request: pb.DetectRequest, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await self._run(request, context.time_remaining())
        except (RequestError, DispatchError) as exc:
            code, message = exc.code, exc.message
        except Exception as exc:  # noqa: BLE001 - a bug must fail this request only, and say so
            code, message = _internal(exc)
        await _abort(context, code, message)

    async def detect_stream(self, requests: AsyncIterator[pb.DetectRequest],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """Requests are served concurrently (up to STREAM_WINDOW); responses go out as they finish.

        The window counts a request from when it is read until its response has
        been sent, so a client that reads slowly holds at most STREAM_WINDOW
        finished responses here.

        A request that fails does not end the stream: its response carries
        error_code/error_message and its request_id, and the stream goes on.
        When the stream ends early (cancelled, deadline), its requests still
        in flight are cancelled too, which gives their slots back.
        """
        window = asyncio.Semaphore(STREAM_WINDOW)
        done: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        pending = 0  # requests read whose response has not been yielded yet

        async def one(req: pb.DetectRequest) -> None:
            try:
                body = await self._run(req, context.time_remaining())
            except (RequestError, DispatchError) as exc:
                body = _error_body(req, exc.code, exc.message)
            except Exception as exc:  # noqa: BLE001 - fail this request, not the stream
                body = _error_body(req, *_internal(exc))
            done.put_nowait(body)  # its window place is given back once the response is sent

        async def reader() -> None:
            nonlocal pending
            try:
                async for req in requests:
                    await window.acquire()
                    pending += 1
                    task = asyncio.get_running_loop().create_task(one(req))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            finally:
                done.put_nowait(_END)

        read_task = asyncio.create_task(reader())
        try:
            ended = False
            while not (ended and pending == 0):
                item = await done.get()
                if item is _END:
                    ended = True
                    if read_task.done() and not read_task.cancelled() and read_task.exception() is not None:
                        log.warning("DetectStream reader failed: %r", read_task.exception())
                    continue
                pending -= 1
                yield item
                window.release()
        finally:
            read_task.cancel()
            for task in list(tasks):
                task.cancel()

    # -- the request path ----------------------------------------------------------------------
    def _resolve_model(self, name: str) -> ModelConfig:
        name = name or self.default_model
        model = self.models.get(name)
        if model is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"model {name!r} is not served here; served: {', '.join(sorted(self.models))}")
        return model

    async def _run(self, request: pb.DetectRequest, time_remaining: float | None) -> bytes:
        """Admission: refuse at once when this frontend already holds max_pending requests."""
        if isinstance(request, CorruptMessage):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        if self._stopping:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry on another replica")
        if self._pending >= self.cfg.max_pending:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"server overloaded: {self._pending} requests already pending on this frontend "
                               f"(max_pending); retry with backoff")
        self._pending += 1
        try:
            return await self._serve(request, time_remaining)
        finally:
            self._pending -= 1

    async def _serve(self, request: pb.DetectRequest, time_remaining: float | None) -> bytes:
        received = time.time()
        timeout = self.cfg.default_timeout_s if time_remaining is None else min(time_remaining, 24 * 3600.0)
        deadline = received + timeout
        give_up_at = deadline - min(GIVE_UP_MARGIN_S, 0.1 * max(timeout, 0.0))
        model = self._resolve_model(request.model)
        check_options(request)
        if self.dispatcher.ready_workers(model.name) == 0 and (error := self.dispatcher.model_error(model.name)):
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"model {model.name!r} failed to load: {error}")
        got = await self.slots.acquire(give_up_at)
        if got is None:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"all {self.ring.slots} shared-memory slots of this frontend stayed busy until the "
                               "deadline; retry later, or the operator can raise --ring-slots or add frontends")
        slot, gen = got
        work = None
        try:
            t0 = time.perf_counter()
            work = self._pool.submit(decode_into_slot, request, model.input_kind == "rgbd",
                                     self.ring.slot_buffer(slot), self.cfg.max_image_pixels)
            decoded = await asyncio.wrap_future(work)
            decode_us = int((time.perf_counter() - t0) * 1e6)
            req = messages.InferRequest(
                id=self.dispatcher.next_id(), ring=self.ring.name, slot=slot, generation=gen,
                color=messages.ArrayRef(offset=decoded.color.offset, shape=decoded.color.shape,
                                        dtype=decoded.color.dtype),
                has_depth=decoded.depth is not None, score_threshold=request.score_threshold,
                mask_format=request.mask_format, deadline=deadline, received_at=received,
                decode_us=decode_us, request_id=request.request_id, model=model.name)
            if decoded.depth is not None:
                req.depth.CopyFrom(messages.ArrayRef(offset=decoded.depth.offset, shape=decoded.depth.shape,
                                                     dtype=decoded.depth.dtype))
            return await self.dispatcher.submit(req, deadline, rebind=lambda: self.ring.bump(slot),
                                                give_up_at=give_up_at)
        finally:
            # Not before the decode thread is done with the slot, even when this task was cancelled.
            self.slots.release_after(slot, work)


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """Ends the call with `code`. A call that ended meanwhile (its deadline passed as we gave up, the
    client went away) cannot take a status any more; gRPC would log that as an error with a
    traceback, though nobody is left to tell. It ends as cancelled instead, quietly."""
    try:
        await context.abort(code, message)
    except grpc.aio.AbortError:
        raise
    except Exception as exc:  # noqa: BLE001 - ExecuteBatchError from the core, for a finished call
        log.debug("call ended before its status %s could be sent (%s)", code.name, exc)
        raise asyncio.CancelledError() from None
    raise AssertionError("unreachable: abort raises")


def _internal(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    log.error("request failed unexpectedly", exc_info=exc)
    return grpc.StatusCode.INTERNAL, (f"internal error in the frontend ({type(exc).__name__}: {exc}); "
                                      "the server keeps serving; please report it with the frontend log")


def _error_body(req: pb.DetectRequest | CorruptMessage, code: grpc.StatusCode, message: str) -> bytes:
    return pb.DetectResponse(request_id=getattr(req, "request_id", ""), model=getattr(req, "model", ""),
                             error_code=code.value[0], error_message=message).SerializeToString()


def run_frontend(models: list[ModelConfig], server: ServerConfig, run_dir: Path, parent_pid: int | None) -> int:
    return asyncio.run(Frontend(models, server, run_dir, parent_pid).serve())

