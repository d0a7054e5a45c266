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

Like every adapter, the module exposes SERVICE_NAMES and handlers(api); dd.frontend.server
registers it on the main port and, with --kserve-port, alone on a port of its own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol

import grpc

from dd.config import ModelConfig
from dd.frontend.errors import ServeError, Status
from dd.frontend.inputs import MASKS_NONE, MASKS_RLE, DetectionRequest, Outcome
from dd.frontend.protocols.detector_v1 import MAX_STATUS_CHARS, abort, grpc_code, internal, parser
from dd.frontend.protocols.kserve_inputs import OUTPUTS, VERSION, InferInputs, check_version, parse_infer
from dd.frontend.protocols import trace
from dd.frontend.protocols.one_message import read_one
from dd.frontend.requests import RequestPath
from dd.frontend.streams import serve_stream
from dd.logsafe import clip
from dd.proto.inference import grpc_service_pb2 as pb
from dd.proto.inference import model_config_pb2 as mc

log = logging.getLogger("dd.frontend.kserve")

SERVICE = "inference.GRPCInferenceService"
SERVICE_NAMES = (SERVICE,)
PROTOCOL = "kserve_v2"  # ipc InferRequest.protocol: the worker's encoder for this protocol
SERVER_NAME = "deep-detection"
PLATFORM = "deep-detection_maskrcnn"
_OUTPUT_TYPES = {"boxes": ("FP32", [-1, 4]), "scores": ("FP32", [-1]), "classes": ("INT32", [-1]),
                 "masks": ("BYTES", [-1])}
_DATA_TYPES = {"UINT8": mc.TYPE_UINT8, "UINT16": mc.TYPE_UINT16, "FP32": mc.TYPE_FP32, "INT32": mc.TYPE_INT32,
               "BYTES": mc.TYPE_STRING}


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


@dataclass
class _Counts:
    """One model's ModelStatistics, as counted by this frontend process (nanoseconds)."""

    success: list[int] = field(default_factory=lambda: [0, 0])
    fail: list[int] = field(default_factory=lambda: [0, 0])
    # From the worker's reply envelope, per successful request (as Triton counts them per request):
    queue: list[int] = field(default_factory=lambda: [0, 0])
    compute_input: list[int] = field(default_factory=lambda: [0, 0])  # the frontend's decoding
    compute_infer: list[int] = field(default_factory=lambda: [0, 0])  # the engine call of its batch
    compute_output: list[int] = field(default_factory=lambda: [0, 0])  # the worker's encoding
    last_inference_ms: int = 0

    def add(self, ns: int, outcome: Outcome | None) -> None:
        """One request answered (outcome) or failed (None), `ns` end to end."""
        pair = self.success if outcome is not None else self.fail
        pair[0] += 1
        pair[1] += ns
        self.last_inference_ms = int(time.time() * 1000)
        if outcome is not None:
            t = outcome.timings
            for pair, us in ((self.queue, t.queue_us), (self.compute_input, t.decode_us),
                             (self.compute_infer, t.inference_us), (self.compute_output, t.encode_us)):
                pair[0] += 1
                pair[1] += us * 1000


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


def handlers(api: RequestPath, shm: SharedMemoryRegistry | None = None) -> list[grpc.GenericRpcHandler]:
    return [KServeV2(api, shm).handler()]


class KServeV2:
    """The gRPC service's handlers around the request path."""

    def __init__(self, api: RequestPath, shm: SharedMemoryRegistry | None = None) -> None:
        self.api = api
        self.shm = shm
        self.counts: dict[str, _Counts] = {name: _Counts() for name in api.models}

    # -- registration -----------------------------------------------------------------------
    def handler(self) -> grpc.GenericRpcHandler:
        """One generic handler for the service. A corrupt message becomes a value the handlers refuse
        with INVALID_ARGUMENT (detector_v1.parser), not gRPC's UNKNOWN."""
        parse = parser

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
            # Read as a stream of one message, as Detect is, so that a message that never finishes arriving
            # is given up after upload_timeout_s.
            "ModelInfer": grpc.stream_unary_rpc_method_handler(
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
                status, message = internal(exc)
            await abort(context, grpc_code(status), message)

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

    def _ready(self, model: str) -> bool:
        return self.api.dispatcher.ready_workers(model) > 0

    async def server_ready(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        """As grpc.health.v1 says: every model has a ready worker, leaving out those that failed to load."""
        dispatcher = self.api.dispatcher
        ready = {m: self._ready(m) for m in self.api.models}
        failed = {m for m in ready if not ready[m] and dispatcher.model_error(m)}
        ok = not self.api.stopping and any(ready.values()) and all(ready[m] for m in ready if m not in failed)
        return pb.ServerReadyResponse(ready=ok)

    async def model_ready(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        known = request.name in self.api.models and request.version in ("", VERSION)
        return pb.ModelReadyResponse(ready=known and not self.api.stopping and self._ready(request.name))

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
            s = stats.inference_stats
            for duration, pair in ((s.success, c.success), (s.fail, c.fail), (s.queue, c.queue),
                                   (s.compute_input, c.compute_input), (s.compute_infer, c.compute_infer),
                                   (s.compute_output, c.compute_output)):
                duration.count, duration.ns = pair
        return resp

    async def repository_index(self, request: pb.RepositoryIndexRequest) -> pb.RepositoryIndexResponse:
        resp = pb.RepositoryIndexResponse()
        for name in sorted(self.api.models):
            ready = self._ready(name)
            if request.ready and not ready:
                continue
            error = self.api.dispatcher.model_error(name)
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
    async def _infer(self, request: Any, time_remaining: float | None, owner: object | None = None,
                     traced: bool = False) -> Outcome:
        """The worker's encoded ModelInferResponse (Outcome.body), or ServeError; counted for ModelStatistics."""
        _check_parsed(request)
        t0 = time.perf_counter_ns()
        try:  # refused here, before the request path (which counts its own): counted for the metrics
            model = self._model(request.model_name)  # NOT_FOUND before any input is looked at
        except ServeError as exc:
            self.api.count_failure(request.model_name, exc)
            raise
        try:
            try:
                inputs = parse_infer(request, model.input_kind, shm=self.shm)
            except ServeError as exc:
                self.api.count_failure(model.name, exc)
                raise
            req = to_request(inputs)
            req.trace = traced
            outcome = await self.api.run(req, time_remaining, owner)
        except ServeError:
            self.counts[model.name].add(time.perf_counter_ns() - t0, None)
            raise
        self.counts[model.name].add(time.perf_counter_ns() - t0, outcome)
        return outcome

    async def model_infer(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> bytes:
        """Traced on request (dd.frontend.protocols.trace)."""
        handler_at = time.time()
        try:
            traced = trace.wanted(context)
            request = await read_one(requests, context.time_remaining(), self.api.cfg.upload_timeout_s, "ModelInfer",
                                     "ModelInferRequest", "ModelStreamInfer")
            outcome = await self._infer(request, context.time_remaining(), traced=traced)
            if traced:
                trace.answer(context, handler_at, outcome.stamps)
            return outcome.body
        except ServeError as exc:
            status, message = exc.status, exc.message
        except Exception as exc:  # noqa: BLE001 - a bug fails this request only, and says so
            status, message = internal(exc)
        await abort(context, grpc_code(status), message)

    async def model_stream_infer(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        """Served concurrently up to the frontend's stream window (dd.frontend.streams). A failed request
        gets a response with error_message (and its id) and the stream goes on, as Triton's does."""

        async def answer(req: Any, owner: object) -> bytes:
            try:
                return stream_response((await self._infer(req, context.time_remaining(), owner)).body)
            except ServeError as exc:
                return stream_error(req, exc.message)
            except Exception as exc:  # noqa: BLE001 - fail this request, not the stream
                return stream_error(req, internal(exc)[1])

        await serve_stream(self.api, requests, answer, context.write, "ModelStreamInfer")


def to_request(inputs: InferInputs) -> DetectionRequest:
    """The checked KServe inputs as the request path's protocol-free request."""
    return DetectionRequest(protocol=PROTOCOL, model=inputs.model, color=inputs.color, depth=inputs.depth,
                            score_threshold=inputs.score_threshold,
                            mask_format=MASKS_RLE if inputs.wants_masks else MASKS_NONE,
                            request_id=inputs.request_id, model_version=inputs.version, outputs=list(inputs.outputs),
                            output_regions=list(inputs.output_regions))


def _check_parsed(request: Any) -> None:
    if type(request).__name__ == "CorruptMessage":
        raise ServeError(Status.INVALID_ARGUMENT, request.message)
