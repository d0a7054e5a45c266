"""KServe v2 / Triton gRPC (inference.GRPCInferenceService): the adapter, so that tritonclient works unchanged.

ModelInfer and ModelStreamInfer take the Detect path: the request is checked here
(kserve_inputs), decoded into the frontend's ring by the protocol-free request path, batched
by a worker, and the worker encodes the ModelInferResponse itself (dd/worker/encoders/kserve_v2);
this adapter hands its bytes to gRPC untouched, and on a stream wraps them in a
ModelStreamInferResponse without parsing them (the wrapper is one tag and a length).

The other calls answer from what the frontend knows: its models' configurations and its
dispatcher's view of the workers. ModelStatistics counts what this frontend process served
(each frontend of a server counts its own; Prometheus metrics give the sum over processes).
System shared memory: the adapter calls the registry it is given (`shm`, dd/frontend/client_shm.py,
made by the frontend with --allow-client-shm); inputs named in a region are read from it straight
into the ring, outputs named in a region are written there by the worker. Without a registry (the
default) those calls answer UNIMPLEMENTED with a message naming --allow-client-shm.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

import grpc

from dd.config import ModelConfig
from dd.frontend.errors import ServeError, Status
from dd.frontend.protocols.kserve_inputs import OUTPUTS, VERSION, InferInputs, check_version, parse_infer
from dd.logsafe import clip
from dd.proto.inference import grpc_service_pb2 as pb
from dd.proto.inference import model_config_pb2 as mc

log = logging.getLogger("dd.frontend.kserve")

SERVICE = "inference.GRPCInferenceService"
PROTOCOL = "kserve_v2"  # ipc InferRequest.protocol: the worker's encoder for this protocol
SERVER_NAME = "deep-detection"
PLATFORM = "deep-detection_maskrcnn"
MAX_STATUS_CHARS = 2048
_OUTPUT_TYPES = {"boxes": ("FP32", [-1, 4]), "scores": ("FP32", [-1]), "classes": ("INT32", [-1]),
                 "masks": ("BYTES", [-1])}
_DATA_TYPES = {"UINT8": mc.TYPE_UINT8, "UINT16": mc.TYPE_UINT16, "FP32": mc.TYPE_FP32, "INT32": mc.TYPE_INT32,
               "BYTES": mc.TYPE_STRING}


def grpc_code(status: Status) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, status.value, grpc.StatusCode.INTERNAL)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("deep-detection")
    except Exception:  # noqa: BLE001 - not installed (a source checkout on PYTHONPATH)
        return "0"


class SharedMemoryRegistry(Protocol):
    """What the adapter needs of a client shared-memory registry (dd/frontend/client_shm.py, --allow-client-shm).

    Each method raises ServeError with the status the client should get."""

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None: ...

    def unregister(self, name: str) -> None: ...  # "": every region

    def status(self, name: str) -> list[Any]: ...  # "": every region; items with name, key, offset, byte_size

    def view(self, name: str, offset: int, byte_size: int) -> memoryview: ...  # an input's bytes, range checked

    def region(self, name: str, offset: int, byte_size: int) -> Any: ...  # an output's range, checked


class FrontendApi(Protocol):
    """What the adapter needs of the frontend: its models, its workers' state, and the request path."""

    models: dict[str, ModelConfig]

    def ready_workers(self, model: str) -> int: ...

    def model_error(self, model: str) -> str: ...

    def server_ready(self) -> bool: ...

    # The protocol-free request path: decode into the ring, dispatch, the worker's encoded reply.
    def infer(self, inputs: InferInputs, time_remaining: float | None, owner: object | None) -> Awaitable[bytes]: ...

    def stream_window(self) -> int: ...


@dataclass
class _Counts:
    """One model's ModelStatistics, as counted by this frontend process (nanoseconds)."""

    success: list[int] = field(default_factory=lambda: [0, 0])
    fail: list[int] = field(default_factory=lambda: [0, 0])
    last_inference_ms: int = 0

    def add(self, ok: bool, ns: int) -> None:
        pair = self.success if ok else self.fail
        pair[0] += 1
        pair[1] += ns
        self.last_inference_ms = int(time.time() * 1000)


def stream_response(infer_response: bytes) -> bytes:
    """ModelStreamInferResponse{infer_response: <bytes>} built around the worker's bytes without parsing them:
    field 2, length-delimited (tag 0x12), then the length as a varint."""
    n, head = len(infer_response), bytearray(b"\x12")
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            head.append(byte | 0x80)
        else:
            head.append(byte)
            return bytes(head) + infer_response


def stream_error(request: Any, message: str) -> bytes:
    """A stream's answer to a failed request: error_message, and the request's id and model to match it."""
    resp = pb.ModelStreamInferResponse(error_message=message[:MAX_STATUS_CHARS])
    if isinstance(request, pb.ModelInferRequest):
        resp.infer_response.id = request.id[:256]
        resp.infer_response.model_name = request.model_name[:256]
        resp.infer_response.model_version = request.model_version[:64]
    return resp.SerializeToString()


class KServeV2:
    """The gRPC service's handlers around a FrontendApi."""

    def __init__(self, api: FrontendApi, shm: SharedMemoryRegistry | None = None) -> None:
        self.api = api
        self.shm = shm
        self.counts: dict[str, _Counts] = {name: _Counts() for name in api.models}

    # -- registration -----------------------------------------------------------------------
    def handler(self, parse: Callable[[type], Callable[[bytes], Any]]) -> grpc.GenericRpcHandler:
        """One generic handler for the service; `parse(cls)` makes the frontend's request deserializer
        (a corrupt message becomes a value the handler refuses with INVALID_ARGUMENT)."""

        def unary(method: Callable, req: type, resp: type) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(self._guard(method), request_deserializer=parse(req),
                                                       response_serializer=resp.SerializeToString)

        passthrough: Callable[[bytes], bytes] = lambda body: body  # noqa: E731
        return grpc.method_handlers_generic_handler(SERVICE, {
            "ServerLive": unary(self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": unary(self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": unary(self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": unary(self.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            "ModelMetadata": unary(self.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            "ModelConfig": unary(self.model_config, pb.ModelConfigRequest, pb.ModelConfigResponse),
            "ModelStatistics": unary(self.model_statistics, pb.ModelStatisticsRequest, pb.ModelStatisticsResponse),
            "RepositoryIndex": unary(self.repository_index, pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
            "SystemSharedMemoryStatus": unary(self.shm_status, pb.SystemSharedMemoryStatusRequest,
                                              pb.SystemSharedMemoryStatusResponse),
            "SystemSharedMemoryRegister": unary(self.shm_register, pb.SystemSharedMemoryRegisterRequest,
                                                pb.SystemSharedMemoryRegisterResponse),
            "SystemSharedMemoryUnregister": unary(self.shm_unregister, pb.SystemSharedMemoryUnregisterRequest,
                                                  pb.SystemSharedMemoryUnregisterResponse),
            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                self.model_infer, request_deserializer=parse(pb.ModelInferRequest), response_serializer=passthrough),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                self.model_stream_infer, request_deserializer=parse(pb.ModelInferRequest),
                response_serializer=passthrough),
        })

    def _guard(self, method: Callable) -> Callable:
        """A unary call: ServeError (and a corrupt message) -> its gRPC status; anything else -> INTERNAL."""

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                _check_parsed(request)
                return await method(request)
            except ServeError as exc:
                status, message = exc.status, exc.message
            except Exception as exc:  # noqa: BLE001 - a bug fails this call only, and says so
                log.exception("KServe %s failed", method.__name__)
                status, message = Status.INTERNAL, f"internal error in the frontend ({type(exc).__name__}: {exc})"
            await context.abort(grpc_code(status), message[:MAX_STATUS_CHARS])

        call.__name__ = method.__name__
        return call

    # -- health and metadata ------------------------------------------------------------------
    def _model(self, name: str, version: str = "") -> ModelConfig:
        model = self.api.models.get(name)
        if model is None:
            raise ServeError(Status.NOT_FOUND, f"model {clip(name)} is not served here; served: "
                                               f"{', '.join(sorted(self.api.models))}")
        check_version(name, version)
        return model

    async def server_live(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.api.server_ready())

    async def model_ready(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        known = request.name in self.api.models and request.version in ("", VERSION)
        return pb.ModelReadyResponse(ready=known and self.api.ready_workers(request.name) > 0)

    async def server_metadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        extensions = ["model_configuration", "statistics"] + (["system_shared_memory"] if self.shm else [])
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=_version(), extensions=extensions)

    async def model_metadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        model = self._model(request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        inputs = [tensor(name="color", datatype="UINT8", shape=[-1, -1, 3])]
        if model.input_kind == "rgbd":
            inputs.append(tensor(name="depth", datatype="UINT16", shape=[-1, -1]))
        outputs = [tensor(name=n, datatype=_OUTPUT_TYPES[n][0], shape=_OUTPUT_TYPES[n][1]) for n in OUTPUTS]
        return pb.ModelMetadataResponse(name=model.name, versions=[VERSION], platform=PLATFORM, inputs=inputs,
                                        outputs=outputs)

    async def model_config(self, request: pb.ModelConfigRequest) -> pb.ModelConfigResponse:
        model = self._model(request.name, request.version)
        inputs = [mc.ModelInput(name="color", data_type=mc.TYPE_UINT8, format=mc.ModelInput.FORMAT_NHWC,
                                dims=[-1, -1, 3])]
        if model.input_kind == "rgbd":
            inputs.append(mc.ModelInput(name="depth", data_type=mc.TYPE_UINT16, dims=[-1, -1]))
        outputs = [mc.ModelOutput(name=n, data_type=_DATA_TYPES[_OUTPUT_TYPES[n][0]], dims=_OUTPUT_TYPES[n][1])
                   for n in OUTPUTS]
        on_cpu = all(d == "cpu" for d in model.devices)
        group = mc.ModelInstanceGroup(name=model.name, count=model.instances_per_device,
                                      kind=mc.ModelInstanceGroup.KIND_CPU if on_cpu else mc.ModelInstanceGroup.KIND_GPU)
        params = {"DETECTION_TYPE": model.detection_type, "ENGINE": model.engine, "INPUT_KIND": model.input_kind,
                  "MIN_SIZE": model.min_size, "MAX_SIZE": model.max_size,
                  "SCORE_THRESH_TEST": model.score_threshold, "MAX_BATCH_SIZE": model.max_batch_size,
                  "CATEGORIES": ",".join(model.categories)}
        config = mc.ModelConfig(
            name=model.name, platform=PLATFORM, backend=SERVER_NAME, max_batch_size=model.max_batch_size,
            input=inputs, output=outputs, instance_group=[group],
            dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=int(model.max_queue_delay_ms * 1000)),
            parameters={k: mc.ModelParameter(string_value=str(v)) for k, v in params.items()})
        return pb.ModelConfigResponse(config=config)

    async def model_statistics(self, request: pb.ModelStatisticsRequest) -> pb.ModelStatisticsResponse:
        names = [self._model(request.name, request.version).name] if request.name else sorted(self.api.models)
        resp = pb.ModelStatisticsResponse()
        for name in names:
            c = self.counts[name]
            stats = resp.model_stats.add(name=name, version=VERSION, last_inference=c.last_inference_ms,
                                         inference_count=c.success[0])
            stats.inference_stats.success.count, stats.inference_stats.success.ns = c.success
            stats.inference_stats.fail.count, stats.inference_stats.fail.ns = c.fail
        return resp

    async def repository_index(self, request: pb.RepositoryIndexRequest) -> pb.RepositoryIndexResponse:
        resp = pb.RepositoryIndexResponse()
        for name in sorted(self.api.models):
            ready = self.api.ready_workers(name) > 0
            if request.ready and not ready:
                continue
            error = self.api.model_error(name)
            state = "READY" if ready else "UNAVAILABLE" if error else "LOADING"
            resp.models.add(name=name, version=VERSION, state=state, reason="" if ready else error)
        return resp

    # -- system shared memory (the hook) ---------------------------------------------------------
    def _registry(self) -> SharedMemoryRegistry:
        if self.shm is None:
            raise ServeError(Status.UNIMPLEMENTED, "client shared memory is off on this server; start it with "
                                                   "--allow-client-shm to register system shared-memory regions")
        return self.shm

    async def shm_status(self, request: pb.SystemSharedMemoryStatusRequest) -> pb.SystemSharedMemoryStatusResponse:
        resp = pb.SystemSharedMemoryStatusResponse()
        for r in self._registry().status(request.name):
            resp.regions[r.name].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(
                name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size))
        return resp

    async def shm_register(self, request: pb.SystemSharedMemoryRegisterRequest) -> pb.SystemSharedMemoryRegisterResponse:
        self._registry().register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def shm_unregister(self, request: pb.SystemSharedMemoryUnregisterRequest) -> pb.SystemSharedMemoryUnregisterResponse:
        self._registry().unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    # -- inference ---------------------------------------------------------------------------------
    async def _infer(self, request: Any, time_remaining: float | None, owner: object | None = None) -> bytes:
        """The worker's encoded ModelInferResponse, or ServeError; counted for ModelStatistics."""
        _check_parsed(request)
        t0 = time.perf_counter_ns()
        model = self._model(request.model_name)  # NOT_FOUND before any input is looked at
        inputs = parse_infer(request, model.input_kind, shm=self.shm)
        try:
            body = await self.api.infer(inputs, time_remaining, owner)
        except ServeError:
            self.counts[model.name].add(False, time.perf_counter_ns() - t0)
            raise
        self.counts[model.name].add(True, time.perf_counter_ns() - t0)
        return body

    async def model_infer(self, request: Any, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await self._infer(request, context.time_remaining())
        except ServeError as exc:
            status, message = exc.status, exc.message
        except Exception as exc:  # noqa: BLE001 - a bug fails this request only, and says so
            status, message = _internal(exc)
        await _abort(context, grpc_code(status), message)

    async def model_stream_infer(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        """Requests are served concurrently, up to the frontend's stream window; responses go out as they
        finish. A failed request gets a response with error_message (and its id) and the stream goes on,
        as Triton's does. When the stream ends early, the requests still in flight are cancelled."""
        window = asyncio.Semaphore(self.api.stream_window())
        done: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        owner = object()  # this stream, for the slot pool's fair share
        end = object()
        pending = 0  # requests read whose response has not been written yet

        async def one(req: Any) -> None:
            try:
                body = stream_response(await self._infer(req, context.time_remaining(), owner))
            except ServeError as exc:
                body = stream_error(req, exc.message)
            except Exception as exc:  # noqa: BLE001 - fail this request, not the stream
                body = stream_error(req, _internal(exc)[1])
            done.put_nowait(body)

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
                done.put_nowait(end)

        read_task = asyncio.create_task(reader())
        read_task.add_done_callback(_quiet_end)
        try:
            ended = False
            while not (ended and pending == 0):
                item = await done.get()
                if item is end:
                    ended = True
                    continue
                pending -= 1
                try:
                    await context.write(item)
                except Exception as exc:  # noqa: BLE001 - the call has ended
                    log.debug("ModelStreamInfer ended while writing (%s)", type(exc).__name__)
                    raise asyncio.CancelledError() from None
                window.release()
        finally:
            read_task.cancel()
            for task in list(tasks):
                task.cancel()


def _check_parsed(request: Any) -> None:
    message = getattr(request, "corrupt_message", None) or (
        request.message if type(request).__name__ == "CorruptMessage" else None)
    if message:
        raise ServeError(Status.INVALID_ARGUMENT, message)


def _internal(exc: BaseException) -> tuple[Status, str]:
    log.error("KServe request failed unexpectedly", exc_info=exc)
    return Status.INTERNAL, (f"internal error in the frontend ({type(exc).__name__}: {exc}); "
                             "the server keeps serving; please report it with the frontend log")


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    try:
        await context.abort(code, message[:MAX_STATUS_CHARS])
    except grpc.aio.AbortError:
        raise
    except Exception as exc:  # noqa: BLE001 - the call ended meanwhile: nobody is left to tell
        log.debug("call ended before its status %s could be sent (%s)", code.name, exc)
        raise asyncio.CancelledError() from None


def _quiet_end(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("ModelStreamInfer read ended with %s", type(task.exception()).__name__)
