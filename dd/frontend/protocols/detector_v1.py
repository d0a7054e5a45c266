"""deep_detection.v1 (gRPC): the Detector service's adapter.

Its handlers (Detect, DetectStream, ListModels) parse the messages, translate a
DetectRequest into the protocol-free DetectionRequest, call the request path
(dd.frontend.requests.RequestPath) and hand the worker's serialized response to
gRPC as it is (a pass-through serializer), so the frontend never parses or
re-encodes results. Errors (ServeError's Status) become gRPC status codes here,
or, on a stream, a DetectResponse with error_code/error_message.

An adapter module exposes `SERVICE_NAMES` (for reflection and health) and
`handlers(api) -> list[grpc.GenericRpcHandler]`; dd.frontend.server registers
every adapter in ADAPTERS through these two.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Callable, NoReturn

import grpc

from dd.frontend.decode import check_options as _check_options
from dd.frontend.errors import ServeError, Status
from dd.frontend.inputs import DetectionRequest, ImageInput, Outcome
from dd.frontend.protocols import trace
from dd.frontend.protocols.one_message import read_one
from dd.frontend.requests import RequestPath
from dd.frontend.streams import serve_stream
from dd.proto.deep_detection.v1 import detector_pb2 as pb

log = logging.getLogger("dd.frontend")

PROTOCOL = "detector_v1"  # ipc InferRequest.protocol: the worker's encoder for this protocol
SERVICE = "deep_detection.v1.Detector"
SERVICE_NAMES = (SERVICE,)
MAX_STATUS_CHARS = 2048  # a status message must fit gRPC's metadata limit, whatever it quotes
_ENCODINGS = {pb.Image.ENCODED: "encoded", pb.Image.RAW: "raw", pb.Image.ZSTD: "zstd"}


# -- errors --------------------------------------------------------------------------------
def grpc_code(status: Status) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, status.value, grpc.StatusCode.INTERNAL)


def error_body(request_id: str, model: str, status: Status, message: str) -> bytes:
    """A DetectStream response for a failed request (the caller cuts what it echoes to its limits)."""
    return pb.DetectResponse(request_id=request_id, model=model, error_code=grpc_code(status).value[0],
                             error_message=message).SerializeToString()


def internal(exc: BaseException) -> tuple[Status, str]:
    log.error("request failed unexpectedly", exc_info=exc)
    return Status.INTERNAL, (f"internal error in the frontend ({type(exc).__name__}: {exc}); "
                             "the server keeps serving; please report it with the frontend log")


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
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


# -- parsing and translation ---------------------------------------------------------------
class CorruptMessage:
    """Stands in for a request whose bytes are no valid protobuf, so the handler can answer
    INVALID_ARGUMENT with a reason instead of gRPC answering UNKNOWN (and logging a traceback)."""

    def __init__(self, kind: str, error: Exception) -> None:
        self.message = f"the request is not a valid {kind} protobuf message ({error})"


def parser(cls: type) -> Callable[[bytes], object]:
    def parse(data: bytes) -> object:
        try:
            return cls.FromString(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and friends
            return CorruptMessage(cls.DESCRIPTOR.full_name, exc)
    return parse


def _passthrough(body: bytes) -> bytes:
    return body


def image_input(img: pb.Image) -> ImageInput:
    """An Image as the request path's ImageInput; an encoding or dtype this version does not know
    keeps its number, so that decode's refusal names it."""
    dtype = pb.DType.Name(img.dtype).lower() if img.dtype in pb.DType.values() else str(img.dtype)
    return ImageInput(data=img.data, encoding=_ENCODINGS.get(img.encoding, str(img.encoding)),
                      shape=tuple(int(s) for s in img.shape), dtype=dtype)


def image_inputs(request: pb.DetectRequest) -> tuple[ImageInput, ImageInput]:
    """(color, depth) of a DetectRequest, for decode_into_slot."""
    return image_input(request.color), image_input(request.depth)


def to_request(request: pb.DetectRequest) -> DetectionRequest:
    color, depth = image_inputs(request)
    return DetectionRequest(protocol=PROTOCOL, model=request.model, color=color, depth=depth,
                            score_threshold=request.score_threshold, mask_format=request.mask_format,
                            request_id=request.request_id)


def check_options(request: pb.DetectRequest) -> None:
    """A DetectRequest's fields other than the images (the request path checks the same)."""
    _check_options(request.score_threshold, request.mask_format)


# -- the service ---------------------------------------------------------------------------
def handlers(api: RequestPath) -> list[grpc.GenericRpcHandler]:
    return [DetectorService(api).handler()]


class DetectorService:
    def __init__(self, api: RequestPath) -> None:
        self.api = api

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            # Read as a stream of one message, so that the handler runs (and its clock starts) before
            # the message has arrived: see detect.
            "Detect": grpc.stream_unary_rpc_method_handler(
                self.detect, request_deserializer=parser(pb.DetectRequest), response_serializer=_passthrough),
            "DetectStream": grpc.stream_stream_rpc_method_handler(
                self.detect_stream, request_deserializer=parser(pb.DetectRequest),
                response_serializer=_passthrough),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                self.list_models, request_deserializer=parser(pb.ListModelsRequest),
                response_serializer=pb.ListModelsResponse.SerializeToString),
        })

    async def _run(self, request: pb.DetectRequest | CorruptMessage, time_remaining: float | None,
                   owner: object | None = None, traced: bool = False) -> Outcome:
        if isinstance(request, CorruptMessage):
            raise ServeError(Status.INVALID_ARGUMENT, request.message)
        req = to_request(request)
        req.trace = traced
        return await self.api.run(req, time_remaining, owner)

    async def list_models(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        if isinstance(request, CorruptMessage):
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, request.message)
        api = self.api
        resp = pb.ListModelsResponse()
        for name, m in api.models.items():
            n = api.dispatcher.ready_workers(name)
            running = api.dispatcher.engines(name)
            resp.models.add(name=name, input_kind=m.input_kind, categories=list(m.categories),
                            engine=",".join(sorted(running)) or m.engine,
                            ready=n > 0, max_batch_size=m.max_batch_size, ready_workers=n,
                            is_default=name == api.default_model,
                            error=api.dispatcher.model_error(name))
        return resp

    async def detect(self, requests: AsyncIterator[pb.DetectRequest], context: grpc.aio.ServicerContext) -> bytes:
        """A unary call, served as a client stream of one message so that a message that never finishes
        arriving (a client stalled one byte short of 60 MB) is given up after upload_timeout_s instead
        of being held for as long as the client likes. Traced on request (dd.frontend.protocols.trace)."""
        handler_at = time.time()
        try:
            traced = trace.wanted(context)
            request = await read_one(requests, context.time_remaining(), self.api.cfg.upload_timeout_s, "Detect",
                                     "DetectRequest", "DetectStream")
            outcome = await self._run(request, context.time_remaining(), traced=traced)
            if traced:
                trace.answer(context, handler_at, outcome.stamps)
            return outcome.body
        except ServeError as exc:
            status, message = exc.status, exc.message
        except Exception as exc:  # noqa: BLE001 - a bug must fail this request only, and say so
            status, message = internal(exc)
        await abort(context, grpc_code(status), message)

    def _error_body(self, req: pb.DetectRequest | CorruptMessage, status: Status, message: str) -> bytes:
        """A stream's response for a failed request; what it echoes is cut to the limits."""
        limit = self.api.cfg.max_request_id_bytes
        return error_body(getattr(req, "request_id", "")[:limit], getattr(req, "model", "")[:limit], status,
                          message[:MAX_STATUS_CHARS])

    async def detect_stream(self, requests: AsyncIterator[pb.DetectRequest],
                            context: grpc.aio.ServicerContext) -> None:
        """Served concurrently up to the stream's window (dd.frontend.streams). A request that fails does
        not end the stream: its response carries error_code/error_message and its request_id."""

        async def answer(req: pb.DetectRequest, owner: object) -> bytes:
            try:
                return (await self._run(req, context.time_remaining(), owner)).body
            except ServeError as exc:
                return self._error_body(req, exc.status, exc.message)
            except Exception as exc:  # noqa: BLE001 - fail this request, not the stream
                return self._error_body(req, *internal(exc))

        await serve_stream(self.api, requests, answer, context.write, "DetectStream")
