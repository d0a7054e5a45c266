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

So is what one client can make the frontend hold or do for it (docs/operations.md,
"Limits"): connections (a cap, an idle timeout, a handshake timeout, keepalive),
calls (at once per frontend and per connection), the time a Detect message may
take to arrive, the length of request_id, finished responses that wait for a
client that does not read them (counted in max_pending, and in bytes), the
slots one stream may hold (its window, at most half the ring, and fair hand-out),
and the cost of decoding an image (dd.frontend.decode). Nothing a client sent is
echoed or logged unclipped (dd.logsafe).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import AsyncIterator, Callable, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dd.config import ModelConfig, ServerConfig, default_model_name
from dd.frontend.auth import TokenAuth, read_token, server_credentials
from dd.frontend.client_shm import ClientShmRegistry
from dd.frontend.decode import check_options, decode_into_slot
from dd.frontend.dispatcher import Dispatcher
from dd.frontend.errors import ServeError, Status
from dd.frontend.protocols import kserve_v2
from dd.frontend.protocols.detector_v1 import PROTOCOL, error_body, grpc_code
from dd.frontend.protocols.kserve_inputs import InferInputs, TensorInput
from dd.frontend.slots import SlotPool
from dd.ipc import endpoints, messages
from dd.ipc.shm_ring import ShmRing, remove_stale_segments, segment_name
from dd.logsafe import clip
from dd.procutil import die_with_parent, parent_alive, return_large_allocations
from dd.proto.deep_detection.v1 import detector_pb2 as pb

log = logging.getLogger("dd.frontend")

SERVICE = "deep_detection.v1.Detector"
# A request that cannot get a slot or a worker gives up this long before its deadline (at most a
# tenth of its timeout), so that the client gets RESOURCE_EXHAUSTED and the reason, not a bare
# DEADLINE_EXCEEDED from its own timer.
GIVE_UP_MARGIN_S = 0.2
ORPHAN_GRACE_S = 1.0  # the supervisor is gone, and with it the workers: no point waiting longer
KEEPALIVE_TIMEOUT_MS = 20_000  # a client that does not answer a keepalive ping this long is gone
CLIENT_PING_INTERVAL_MS = 10_000  # clients may keepalive-ping this often (gRPC's default allows every 5 min)
FILES_RESERVED = 256  # open files a frontend keeps for itself (shared memory, sockets, logs) below its limit
MAX_STATUS_CHARS = 2048  # a status message must fit gRPC's metadata limit, whatever it quotes
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
        self._pending = 0  # requests admitted and not finished, plus finished responses a stream holds
        self._held_bytes = 0  # bytes of finished responses that streams hold for their clients
        self._pool = ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)),
                                        thread_name_prefix="decode")
        self._stopping = False
        self.client_shm: ClientShmRegistry | None = None

    # -- setup -----------------------------------------------------------------------------
    def _max_inflight(self, model: str) -> int:
        # A model this frontend does not know (a worker of another configuration) gets the minimum.
        return self.cfg.worker_credits(self.models[model].max_batch_size if model in self.models else 1)

    async def serve(self) -> int:
        # Linux sends SIGTERM if the supervisor dies, even while this loop is busy; the watch below
        # is the fallback where prctl is not available.
        die_with_parent(self.parent_pid)
        return_large_allocations()  # request messages of tens of MB go back to the system once freed
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
        server = grpc.aio.server(interceptors=interceptors, options=self._grpc_options(),
                                 maximum_concurrent_rpcs=self.cfg.max_concurrent_calls)
        # Client shared memory (--allow-client-shm): registrations shared with the other frontends
        # through the run directory.
        self.client_shm = ClientShmRegistry(self.run_dir) if self.cfg.allow_client_shm else None
        self.kserve = kserve_v2.KServeV2(self, shm=self.client_shm)
        kserve_handler = self.kserve.handler(_parser)
        server.add_generic_rpc_handlers((self._handlers(), kserve_handler))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection(
            [SERVICE, kserve_v2.SERVICE, health_name, reflection.SERVICE_NAME], server)
        address = f"{self.cfg.host}:{self.cfg.port}"
        creds = server_credentials(self.cfg)
        port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
        if port == 0:
            raise RuntimeError(f"cannot listen on {address}")
        servers = [server]
        if self.cfg.kserve_port:  # KServe alone, as Triton's own port: its service, health and reflection
            kserver = grpc.aio.server(interceptors=interceptors, options=self._grpc_options(),
                                      maximum_concurrent_rpcs=self.cfg.max_concurrent_calls)
            kserver.add_generic_rpc_handlers((kserve_handler,))
            health_pb2_grpc.add_HealthServicer_to_server(self.health, kserver)
            reflection.enable_server_reflection([kserve_v2.SERVICE, health_name, reflection.SERVICE_NAME], kserver)
            kaddress = f"{self.cfg.host}:{self.cfg.kserve_port}"
            if (kserver.add_secure_port(kaddress, creds) if creds else kserver.add_insecure_port(kaddress)) == 0:
                raise RuntimeError(f"cannot listen on {kaddress} (--kserve-port)")
            servers.append(kserver)
        await self.dispatcher.start()
        for s in servers:
            await s.start()
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
        await asyncio.gather(*(s.stop(grace) for s in servers))
        await self.dispatcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.ring.close()
        self.ring.unlink()
        if self.client_shm is not None:
            self.client_shm.close()  # this process's mappings; the supervisor removes the registrations
        log.info("frontend stopped")
        return 0

    def _grpc_options(self) -> list[tuple[str, int]]:
        """gRPC's own limits: messages, connections (cap, idle, handshake, keepalive), streams per connection."""
        cfg = self.cfg
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        connections = cfg.max_connections
        if soft != resource.RLIM_INFINITY and connections > soft - FILES_RESERVED:
            connections = max(16, soft - FILES_RESERVED)
            log.warning("max_connections %d lowered to %d: this process may open %d files (ulimit -n); "
                        "raise the hard limit to allow more", cfg.max_connections, connections, soft)
        return [
            ("grpc.max_receive_message_length", int(cfg.max_message_mb * 2**20)),
            ("grpc.max_send_message_length", int(cfg.max_message_mb * 2**20)),
            ("grpc.so_reuseport", 1),
            ("grpc.max_concurrent_streams", cfg.max_streams_per_connection),
            ("grpc.max_allowed_incoming_connections", connections),
            ("grpc.max_connection_idle_ms", int(cfg.idle_timeout_s * 1000)),
            ("grpc.server_handshake_timeout_ms", int(cfg.handshake_timeout_s * 1000)),
            ("grpc.keepalive_time_ms", int(cfg.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.http2.min_ping_interval_without_data_ms", CLIENT_PING_INTERVAL_MS),
        ]

    # -- health ----------------------------------------------------------------------------
    def server_ready(self) -> bool:
        """What health says: every model has a ready worker, leaving out those that failed to load."""
        if self.dispatcher is None or self._stopping:
            return False
        ready = {m: self.dispatcher.ready_workers(m) > 0 for m in self.models}
        failed = {m for m in self.models if not ready[m] and self.dispatcher.model_error(m)}
        return any(ready.values()) and all(ready[m] for m in self.models if m not in failed)

    def ready_workers(self, model: str) -> int:
        return self.dispatcher.ready_workers(model) if self.dispatcher else 0

    def model_error(self, model: str) -> str:
        return self.dispatcher.model_error(model) if self.dispatcher else ""

    def stream_window(self) -> int:
        return self.cfg.resolved_stream_window()

    async def infer(self, inputs: InferInputs, time_remaining: float | None, owner: object | None) -> bytes:
        """A KServe request on the Detect path (admission, decode into the ring, dispatch); the worker
        encodes the KServe response. The tensors' bytes go to the decode step as they are (a view of
        the message, or of the client's shared memory): the decode writes them into the ring slot,
        the one copy they make."""
        request = _KServeRequest(pb.DetectRequest(score_threshold=inputs.score_threshold,
                                                  mask_format=pb.RLE if inputs.wants_masks else pb.NONE,
                                                  request_id=inputs.request_id, model=inputs.model),
                                 _image(inputs.color), _image(inputs.depth) if inputs.depth is not None else None)
        regions = [messages.OutputRegion(output=r.output, shm_key=r.key, offset=r.offset, byte_size=r.byte_size)
                   for r in inputs.output_regions]
        return await self._run(request, time_remaining, owner, protocol=kserve_v2.PROTOCOL,
                               outputs=inputs.outputs, model_version=inputs.version, output_regions=regions)

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
        for name in ("", SERVICE, kserve_v2.SERVICE):
            await self.health.set(name, status)
        for name in self.models:
            await self.health.set(name, status if per_model is None else per_model[name])

    # -- handlers ----------------------------------------------------------------------------
    def _handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            # Read as a stream of one message, so that the handler runs (and its clock starts) before
            # the message has arrived: see detect.
            "Detect": grpc.stream_unary_rpc_method_handler(
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

    async def detect(self, requests: AsyncIterator[pb.DetectRequest], context: grpc.aio.ServicerContext) -> bytes:
        """A unary call, served as a client stream of one message so that a message that never finishes
        arriving (a client stalled one byte short of 60 MB) is given up after upload_timeout_s instead
        of being held for as long as the client likes."""
        try:
            request = await self._read_one(requests, context.time_remaining())
            return await self._run(request, context.time_remaining())
        except ServeError as exc:
            status, message = exc.status, exc.message
        except Exception as exc:  # noqa: BLE001 - a bug must fail this request only, and say so
            status, message = _internal(exc)
        await _abort(context, grpc_code(status), message)

    async def _read_one(self, requests: AsyncIterator[pb.DetectRequest], time_remaining: float | None):
        """The call's one message, and then the end of its stream (a unary client sends both at once).

        The end is read too: a call whose handler ends before gRPC has seen the end of its request
        stream keeps the received message in memory after the call is over (23 MB a call, measured).
        """
        wait = self.cfg.upload_timeout_s if time_remaining is None else min(self.cfg.upload_timeout_s, time_remaining)
        until = time.monotonic() + wait
        try:
            request = await asyncio.wait_for(requests.__anext__(), timeout=wait)
            try:
                await asyncio.wait_for(requests.__anext__(), timeout=max(0.0, until - time.monotonic()))
            except StopAsyncIteration:
                return request
            raise ServeError(Status.INVALID_ARGUMENT,
                               "Detect takes one DetectRequest; use DetectStream for several")
        except StopAsyncIteration:
            raise ServeError(Status.INVALID_ARGUMENT, "the call carried no DetectRequest") from None
        except asyncio.TimeoutError:
            raise ServeError(Status.DEADLINE_EXCEEDED,
                               f"the request message did not arrive within {wait:.0f} s of the call's start "
                               "(upload_timeout_s); send smaller images or ask the operator to raise "
                               "--upload-timeout") from None

    async def detect_stream(self, requests: AsyncIterator[pb.DetectRequest],
                            context: grpc.aio.ServicerContext) -> None:
        """Requests are served concurrently (up to the stream's window); responses go out as they finish.

        The window counts a request from when it is read until its response has
        been sent, so a client that reads slowly holds at most a window of
        finished responses here (each at most max_message_mb); they count
        towards max_pending, and in bytes towards max_held_response_mb, until sent. The window is at most
        half the ring, and slots go to the caller that holds the fewest, so a
        stream never takes every slot of its frontend.

        A request that fails does not end the stream: its response carries
        error_code/error_message and its request_id, and the stream goes on.
        When the stream ends early (cancelled, deadline), its requests still
        in flight are cancelled too, which gives their slots back, and the
        stream ends quietly: nobody is left to tell.
        """
        window = asyncio.Semaphore(self.cfg.resolved_stream_window())
        done: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        owner = object()  # this stream, for the slot pool's fair share
        pending = 0  # requests read whose response has not been written yet

        async def one(req: pb.DetectRequest) -> None:
            try:
                body = await self._run(req, context.time_remaining(), owner)
            except ServeError as exc:
                body = self._error_body(req, exc.status, exc.message)
            except Exception as exc:  # noqa: BLE001 - fail this request, not the stream
                body = self._error_body(req, *_internal(exc))
            # Held until written: counted like a request in flight, so that clients that do not read
            # cannot make this frontend hold responses that no limit sees.
            self._pending += 1
            self._held_bytes += len(body)
            done.put_nowait(body)  # its window place is given back once the response is written

        def written(body: bytes) -> None:
            self._pending -= 1
            self._held_bytes -= len(body)

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
        read_task.add_done_callback(_quiet_end)
        try:
            ended = False
            while not (ended and pending == 0):
                item = await done.get()
                if item is _END:
                    ended = True
                    continue
                pending -= 1
                try:
                    await context.write(item)
                except Exception as exc:  # noqa: BLE001 - ExecuteBatchError and friends: the call has ended
                    log.debug("DetectStream ended while writing a response (%s)", type(exc).__name__)
                    raise asyncio.CancelledError() from None
                finally:
                    written(item)
                window.release()
        finally:
            read_task.cancel()
            for task in list(tasks):
                task.cancel()
            while not done.empty():  # finished responses nobody will read
                item = done.get_nowait()
                if item is not _END:
                    written(item)

    # -- the request path ----------------------------------------------------------------------
    def _resolve_model(self, name: str) -> ModelConfig:
        name = name or self.default_model
        model = self.models.get(name)
        if model is None:
            raise ServeError(Status.NOT_FOUND,
                               f"model {clip(name)} is not served here; served: {', '.join(sorted(self.models))}")
        return model

    def _error_body(self, req: pb.DetectRequest | CorruptMessage, status: Status, message: str) -> bytes:
        """A stream's response for a failed request; what it echoes is cut to the limits."""
        limit = self.cfg.max_request_id_bytes
        return error_body(getattr(req, "request_id", "")[:limit], getattr(req, "model", "")[:limit], status,
                          message[:MAX_STATUS_CHARS])

    async def _run(self, request: pb.DetectRequest, time_remaining: float | None, owner: object | None = None,
                   **protocol: object) -> bytes:
        """Admission: refuse at once when this frontend already holds max_pending requests (or finished
        responses), or max_held_response_mb of responses its clients do not read."""
        if isinstance(request, CorruptMessage):
            raise ServeError(Status.INVALID_ARGUMENT, request.message)
        rid_bytes = len(request.request_id.encode())
        if rid_bytes > self.cfg.max_request_id_bytes:
            raise ServeError(Status.INVALID_ARGUMENT,
                               f"request_id is {rid_bytes} bytes; at most {self.cfg.max_request_id_bytes} "
                               "(max_request_id_bytes)")
        if self._stopping:
            raise ServeError(Status.UNAVAILABLE, "server is shutting down; retry on another replica")
        if self._pending >= self.cfg.max_pending:
            raise ServeError(Status.RESOURCE_EXHAUSTED,
                               f"server overloaded: {self._pending} requests already pending on this frontend "
                               f"(max_pending); retry with backoff")
        if self._held_bytes > self.cfg.max_held_response_mb * 2**20:
            raise ServeError(Status.RESOURCE_EXHAUSTED,
                               f"server overloaded: {self._held_bytes / 2**20:.0f} MiB of finished responses wait "
                               "for streams that do not read them (max_held_response_mb); retry with backoff")
        self._pending += 1
        try:
            return await self._serve(request, time_remaining, owner, **protocol)
        finally:
            self._pending -= 1

    async def _serve(self, request: pb.DetectRequest, time_remaining: float | None, owner: object | None,
                     protocol: str = PROTOCOL, outputs: tuple[str, ...] = (), model_version: str = "",
                     output_regions: list | None = None) -> bytes:
        received = time.time()
        timeout = self.cfg.default_timeout_s if time_remaining is None else min(time_remaining, 24 * 3600.0)
        deadline = received + timeout
        give_up_at = deadline - min(GIVE_UP_MARGIN_S, 0.1 * max(timeout, 0.0))
        model = self._resolve_model(request.model)
        check_options(request)
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
            work = self._pool.submit(decode_into_slot, request, model.input_kind == "rgbd",
                                     self.ring.slot_buffer(slot), self.cfg.max_image_pixels,
                                     max_jpeg_scans=self.cfg.max_jpeg_scans, resize=(model.min_size, model.max_size),
                                     abandoned=abandoned)
            decoded = await asyncio.wrap_future(work)
            decode_us = int((time.perf_counter() - t0) * 1e6)
            req = messages.InferRequest(
                id=self.dispatcher.next_id(), ring=self.ring.name, slot=slot, generation=gen,
                color=messages.ArrayRef(offset=decoded.color.offset, shape=decoded.color.shape,
                                        dtype=decoded.color.dtype),
                has_depth=decoded.depth is not None, score_threshold=request.score_threshold,
                mask_format=request.mask_format, deadline=deadline, received_at=received,
                decode_us=decode_us, request_id=request.request_id, model=model.name, protocol=protocol,
                outputs=outputs, model_version=model_version, output_regions=output_regions or [])
            if decoded.depth is not None:
                req.depth.CopyFrom(messages.ArrayRef(offset=decoded.depth.offset, shape=decoded.depth.shape,
                                                     dtype=decoded.depth.dtype))
            return await self.dispatcher.submit(req, deadline, rebind=lambda: self.ring.bump(slot),
                                                give_up_at=give_up_at)
        finally:
            abandoned.set()
            # Not before the decode thread is done with the slot, even when this task was cancelled.
            self.slots.release_after(slot, work)


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """Ends the call with `code`. A call that ended meanwhile (its deadline passed as we gave up, the
    client went away) cannot take a status any more; gRPC would log that as an error with a
    traceback, though nobody is left to tell. It ends as cancelled instead, quietly."""
    try:
        await context.abort(code, message[:MAX_STATUS_CHARS])
    except grpc.aio.AbortError:
        raise
    except Exception as exc:  # noqa: BLE001 - ExecuteBatchError from the core, for a finished call
        log.debug("call ended before its status %s could be sent (%s)", code.name, exc)
        raise asyncio.CancelledError() from None
    raise AssertionError("unreachable: abort raises")


def _quiet_end(task: asyncio.Task) -> None:
    """A stream whose client went away ends its read with an error (ExecuteBatchError): nothing to report,
    and retrieved here so that asyncio does not log it with a traceback at ERROR."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("DetectStream read ended with %s", type(task.exception()).__name__)


def _internal(exc: BaseException) -> tuple[Status, str]:
    log.error("request failed unexpectedly", exc_info=exc)
    return Status.INTERNAL, (f"internal error in the frontend ({type(exc).__name__}: {exc}); "
                                      "the server keeps serving; please report it with the frontend log")


def run_frontend(models: list[ModelConfig], server: ServerConfig, run_dir: Path, parent_pid: int | None) -> int:
    return asyncio.run(Frontend(models, server, run_dir, parent_pid).serve())



_RAW_DTYPES = {"uint8": pb.UINT8, "uint16": pb.UINT16, "float32": pb.FLOAT32}


class _Image:
    """An image as decode_into_slot reads it (encoding, data, shape, dtype), whose data may be a view of
    a KServe message or of client shared memory: a protobuf Image would copy the bytes first."""

    __slots__ = ("encoding", "data", "shape", "dtype")

    def __init__(self, encoding: int, data: bytes | memoryview, shape: tuple[int, ...] = (), dtype: int = 0) -> None:
        self.encoding, self.data, self.shape, self.dtype = encoding, data, list(shape), dtype


def _image(t: TensorInput) -> _Image:
    if t.encoding == "encoded":  # compressed, small: bytes for the header checks (they use bytes' methods)
        return _Image(pb.Image.ENCODED, bytes(t.data))
    return _Image(pb.Image.RAW, t.data, t.shape, _RAW_DTYPES[t.dtype])


class _KServeRequest:
    """A DetectRequest's options with images of its own (see _Image); what the request path reads."""

    def __init__(self, options: pb.DetectRequest, color: _Image, depth: _Image | None) -> None:
        self._options = options
        self.color = color
        self.depth = depth if depth is not None else _Image(pb.Image.ENCODED, b"")

    def __getattr__(self, name: str) -> object:
        return getattr(self._options, name)
