"""The frontend process: a grpc.aio server in front of the workers.

Stateless but for the requests in flight: it validates, decodes into its own
shared-memory ring, sends a control message to a worker and hands the worker's
serialized response to gRPC as it is (a pass-through serializer), so it never
parses or re-encodes results. Several frontends may share one port
(SO_REUSEPORT), each with its own ring, so decoding scales over cores.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dd.config import ModelConfig, ServerConfig, default_model_name
from dd.frontend.decode import RequestError, check_threshold, decode_into_slot
from dd.frontend.dispatcher import DispatchError, Dispatcher
from dd.ipc import endpoints, messages
from dd.ipc.shm_ring import ShmRing, remove_stale_segments, segment_name
from dd.procutil import parent_alive
from dd.proto.deep_detection.v1 import detector_pb2 as pb

log = logging.getLogger("dd.frontend")

SERVICE = "deep_detection.v1.Detector"
STREAM_WINDOW = 32  # requests of one DetectStream in flight at once


def _passthrough(body: bytes) -> bytes:
    return body


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
        self.dispatcher: Dispatcher | None = None
        self.health = health.aio.HealthServicer()
        self._slot_freed: asyncio.Condition | None = None
        self._pool = ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)),
                                        thread_name_prefix="decode")
        self._stopping = False

    # -- setup -----------------------------------------------------------------------------
    def _max_inflight(self, model: str) -> int:
        if self.cfg.max_inflight_per_worker > 0:
            return self.cfg.max_inflight_per_worker
        return 2 * self.models[model].max_batch_size if model in self.models else 2

    async def serve(self) -> int:
        remove_stale_segments(self.tag, only_dead=True)
        self.ring = ShmRing.create(segment_name(self.tag, "fe"), self.cfg.ring_slots, self.cfg.slot_bytes())
        self._slot_freed = asyncio.Condition()
        self.dispatcher = Dispatcher(self.run_dir, self._max_inflight, on_change=self._update_health)
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", int(self.cfg.max_message_mb * 2**20)),
            ("grpc.max_send_message_length", int(self.cfg.max_message_mb * 2**20)),
            ("grpc.so_reuseport", 1),
        ])
        server.add_generic_rpc_handlers((self._handlers(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
        address = f"{self.cfg.host}:{self.cfg.port}"
        port = server.add_insecure_port(address)
        if port == 0:
            raise RuntimeError(f"cannot listen on {address}")
        await self.dispatcher.start()
        await server.start()
        self._update_health()
        log.info("frontend pid %d serving %s on %s (ring %s: %d slots of %.1f MiB)", os.getpid(),
                 ", ".join(self.models), address, self.ring.name, self.ring.slots, self.ring.slot_bytes / 2**20)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=0.5)
            except asyncio.TimeoutError:
                pass
            if not parent_alive(self.parent_pid):
                log.warning("supervisor is gone; frontend exits")
                break
        self._stopping = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("frontend stopping: finishing %d request(s) in flight (grace %.0f s)",
                 self.dispatcher.inflight(), self.cfg.grace_s)
        await server.stop(self.cfg.grace_s)
        await self.dispatcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.ring.close()
        self.ring.unlink()
        log.info("frontend stopped")
        return 0

    # -- health ----------------------------------------------------------------------------
    def _update_health(self) -> None:
        if self.dispatcher is None or self._stopping:
            return
        ok = all(self.dispatcher.ready_workers(m) > 0 for m in self.models)
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        asyncio.get_running_loop().create_task(self._set_health(status))

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE):
            await self.health.set(name, status)

    # -- handlers ----------------------------------------------------------------------------
    def _handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Detect": grpc.unary_unary_rpc_method_handler(
                self.detect, request_deserializer=pb.DetectRequest.FromString, response_serializer=_passthrough),
            "DetectStream": grpc.stream_stream_rpc_method_handler(
                self.detect_stream, request_deserializer=pb.DetectRequest.FromString,
                response_serializer=_passthrough),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                self.list_models, request_deserializer=pb.ListModelsRequest.FromString,
                response_serializer=pb.ListModelsResponse.SerializeToString),
        })

    async def list_models(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        resp = pb.ListModelsResponse()
        for name, m in self.models.items():
            n = self.dispatcher.ready_workers(name) if self.dispatcher else 0
            resp.models.add(name=name, input_kind=m.input_kind, categories=list(m.categories), engine=m.engine,
                            ready=n > 0, max_batch_size=m.max_batch_size, ready_workers=n,
                            is_default=name == self.default_model)
        return resp

    async def detect(self, request: pb.DetectRequest, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await self._run(request, context.time_remaining())
        except (RequestError, DispatchError) as exc:
            await context.abort(exc.code, exc.message)
            raise  # unreachable: abort raises

    async def detect_stream(self, requests: AsyncIterator[pb.DetectRequest],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """Requests are served concurrently (up to STREAM_WINDOW); responses go out as they finish.

        A request that fails does not end the stream: its response carries
        error_code/error_message and its request_id, and the stream goes on.
        """
        window = asyncio.Semaphore(STREAM_WINDOW)
        done: asyncio.Queue = asyncio.Queue()
        pending = 0
        reader_done = False

        async def one(req: pb.DetectRequest) -> None:
            try:
                body = await self._run(req, context.time_remaining())
            except (RequestError, DispatchError) as exc:
                body = pb.DetectResponse(request_id=req.request_id, model=req.model,
                                         error_code=exc.code.value[0], error_message=exc.message).SerializeToString()
            finally:
                window.release()
            await done.put(body)

        async def reader() -> None:
            nonlocal pending, reader_done
            async for req in requests:
                await window.acquire()
                pending += 1
                asyncio.get_running_loop().create_task(one(req))
            reader_done = True
            await done.put(None)

        read_task = asyncio.create_task(reader())
        try:
            while True:
                item = await done.get()
                if item is None:
                    if pending == 0:
                        break
                    continue
                pending -= 1
                yield item
                if reader_done and pending == 0:
                    break
        finally:
            read_task.cancel()

    # -- the request path ----------------------------------------------------------------------
    def _resolve_model(self, name: str) -> ModelConfig:
        name = name or self.default_model
        model = self.models.get(name)
        if model is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"model {name!r} is not served here; served: {', '.join(sorted(self.models))}")
        return model

    async def _acquire_slot(self, deadline: float) -> tuple[int, int]:
        assert self.ring is not None and self._slot_freed is not None
        async with self._slot_freed:
            while True:
                got = self.ring.allocate()
                if got is not None:
                    return got
                left = deadline - time.time()
                if left <= 0:
                    raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                       f"all {self.ring.slots} shared-memory slots of this frontend are busy; "
                                       "retry later, or the operator can raise --ring-slots")
                try:
                    await asyncio.wait_for(self._slot_freed.wait(), timeout=left)
                except asyncio.TimeoutError:
                    pass

    async def _free_slot(self, slot: int) -> None:
        assert self.ring is not None and self._slot_freed is not None
        self.ring.free(slot)
        async with self._slot_freed:
            self._slot_freed.notify()

    async def _run(self, request: pb.DetectRequest, time_remaining: float | None) -> bytes:
        received = time.time()
        if self._stopping:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        timeout = self.cfg.default_timeout_s if time_remaining is None else min(time_remaining, 24 * 3600.0)
        deadline = received + timeout
        model = self._resolve_model(request.model)
        check_threshold(request.score_threshold)
        if request.mask_format not in (pb.RLE, pb.NONE):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown mask_format {request.mask_format}")
        if self.dispatcher.ready_workers(model.name) == 0 and self.dispatcher.model_error(model.name):
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"model {model.name!r} failed to load: "
                               f"{self.dispatcher.model_error(model.name)}")
        slot, gen = await self._acquire_slot(deadline)
        try:
            t0 = time.perf_counter()
            decoded = await asyncio.get_running_loop().run_in_executor(
                self._pool, decode_into_slot, request, model.input_kind == "rgbd",
                self.ring.slot_buffer(slot), self.cfg.max_image_pixels)
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
            return await self.dispatcher.submit(req, deadline, rebind=lambda: self.ring.bump(slot))
        finally:
            await self._free_slot(slot)


def run_frontend(models: list[ModelConfig], server: ServerConfig, run_dir: Path, parent_pid: int | None) -> int:
    return asyncio.run(Frontend(models, server, run_dir, parent_pid).serve())

