"""Client library: build requests from files, bytes or arrays; get typed results back.

Masks stay COCO RLE until asked for (Instance.mask decodes on demand), so a
client that needs only boxes pays nothing for them. Images go out in the encoding a
client picks for its link (dd.client.encoding: raw arrays to a local server, JPEG +
zstd depth to a remote one). Every call that fails
raises dd.client.DetectionError (status code, the server's message, the model),
never gRPC's internal error types.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable, Iterator

import grpc

from dd.client import encoding as wire
from dd.client.encoding import ENCODINGS, ImageLike
from dd.client.errors import DetectionError
from dd.proto.deep_detection.v1 import detector_pb2 as pb
from dd.proto.deep_detection.v1 import detector_pb2_grpc as pb_grpc

__all__ = ["ENCODINGS", "AsyncDetectorClient", "DetectorClient", "ImageLike", "Instance", "Result", "make_request",
           "to_image"]


def to_image(value: ImageLike, encoding: str = "as-is", *, depth: bool = False) -> pb.Image:
    """One image in a concrete `encoding` (dd.client.encoding). The default, `as-is`: a path or bytes
    are sent encoded (the server decodes); an array is sent raw (color must be RGB)."""
    return wire.to_image(value, encoding, depth=depth)


def make_request(color: ImageLike, depth: ImageLike | None = None, *, model: str = "", score_threshold: float = 0.0,
                 masks: bool = True, request_id: str = "", encoding: str = "as-is") -> pb.DetectRequest:
    """A request; `encoding` as in dd.client.encoding (`raw`, `jpeg+zstd`, `jpeg+png`, `as-is`). A
    client's own make_request picks it for the client's link."""
    req = pb.DetectRequest(model=model, color=to_image(color, encoding), score_threshold=score_threshold,
                           mask_format=pb.RLE if masks else pb.NONE, request_id=request_id)
    if depth is not None:
        req.depth.CopyFrom(to_image(depth, encoding, depth=True))
    return req


def _call_error(exc: grpc.RpcError, request: pb.DetectRequest, target: str) -> DetectionError:
    err = DetectionError.from_rpc(exc, model=request.model, target=target)
    if err.code() == grpc.StatusCode.INVALID_ARGUMENT and (hint := wire.old_server_hint(err.details(), request)):
        return DetectionError(err.code(), hint, model=request.model, target=target)
    return err


@dataclass
class Instance:
    class_id: int
    class_name: str
    score: float
    box: tuple[float, float, float, float]
    rle: dict | None = field(default=None, repr=False)

    @property
    def mask(self) -> np.ndarray | None:
        """The full-image boolean mask (H x W), decoded from RLE on first use."""
        if self.rle is None:
            return None
        if "_decoded" not in self.__dict__:
            from pycocotools import mask as mask_util

            self.__dict__["_decoded"] = mask_util.decode(self.rle).astype(bool)
        return self.__dict__["_decoded"]


@dataclass
class Result:
    request_id: str
    model: str
    height: int
    width: int
    instances: list[Instance]
    timing: dict[str, int]
    worker: str = ""
    error_code: int = 0
    error_message: str = ""
    # detect_request(trace=True): when (time.time() seconds) the request passed each hop, the client's
    # `client_sent` and `client_received` (the response parsed) around the server's (dd.frontend.protocols.trace).
    # Meaningful as differences only where client and server share a clock (the same host).
    trace: dict[str, float] | None = None

    @classmethod
    def from_proto(cls, resp: pb.DetectResponse) -> "Result":
        # Each submessage read once: every attribute access builds a wrapper, and for 100 instances the
        # straightforward loop cost 0.44-0.8 ms per response on the CPU box (this one about a third).
        instances, rle_format = [], pb.RLE
        for i in resp.instances:
            m, b = i.mask, i.box
            counts = m.counts if m.format == rle_format else b""
            rle = {"size": [m.height, m.width], "counts": counts} if counts else None
            instances.append(Instance(i.class_id, i.class_name, i.score, (b.x1, b.y1, b.x2, b.y2), rle))
        t = resp.timing
        timing = {"queued_us": t.queued_us, "decode_us": t.decode_us, "inference_us": t.inference_us,
                  "postprocess_us": t.postprocess_us, "total_us": t.total_us, "batch_size": t.batch_size}
        return cls(resp.request_id, resp.model, resp.height, resp.width, instances, timing, resp.worker,
                   resp.error_code, resp.error_message)


def _channel_options(max_message_mb: float) -> list[tuple[str, int]]:
    n = int(max_message_mb * 2**20)
    return [("grpc.max_send_message_length", n), ("grpc.max_receive_message_length", n)]


# Connections a client opens at most by default. A server's frontends share its port (SO_REUSEPORT): the
# kernel gives each TCP connection to one frontend, so the calls of a client with one connection are all
# decoded by one process however many the server runs (H200, BENCHMARKS.md S13-2 and S13-4: 4 client
# processes with one connection each left frontends without a request and served 0.75 of the engine;
# with 8 each, 0.93). Channels connect lazily: a client that never has two calls in flight opens one.
CONNECTIONS = 8


class _Connections:
    """A client's channels, each its own TCP connection, and the calls in flight on each: a call goes to
    the one with the fewest (the first of those), so a frontend that answers slower (busier) gets fewer
    new calls, and a client with one call in flight at a time keeps to one warm connection. Safe to
    share between threads."""

    def __init__(self, make_channel: Callable[..., Any], target: str, credentials: grpc.ChannelCredentials | None,
                 opts: list[tuple[str, int]], n: int) -> None:
        if n < 1:
            raise ValueError(f"connections must be at least 1, got {n}")
        # Without a local subchannel pool, gRPC shares one connection among channels with equal arguments.
        opts = opts + [("grpc.use_local_subchannel_pool", 1)] if n > 1 else opts
        self.channels = [make_channel(target, credentials, opts) if credentials else make_channel(target, opts)
                         for _ in range(n)]
        self.stubs = [pb_grpc.DetectorStub(ch) for ch in self.channels]
        self.in_flight = [0] * n
        self._lock = threading.Lock()

    def acquire(self) -> int:
        with self._lock:
            i = self.in_flight.index(min(self.in_flight))
            self.in_flight[i] += 1
            return i

    def release(self, i: int) -> None:
        with self._lock:
            self.in_flight[i] -= 1


def _metadata(token: str | None) -> list[tuple[str, str]] | None:
    return [("authorization", f"Bearer {token}")] if token else None


TRACE_KEY = "dd-trace"  # the metadata a traced call sends and gets back (dd.frontend.protocols.trace)


def _traced(metadata: list[tuple[str, str]] | None) -> list[tuple[str, str]]:
    return [*(metadata or ()), (TRACE_KEY, "1")]


def _with_trace(result: Result, sent: float, trailing: Any) -> Result:
    """The server's hops from the trailing metadata, between the client's own; a server that does not
    trace (an older one) leaves only the client's."""
    server = {}
    for key, value in trailing or ():
        if key == TRACE_KEY:
            server = {k: float(v) for k, v in json.loads(value).items()}
    result.trace = {"client_sent": sent, **server, "client_received": time.time()}
    return result


class DetectorClient:
    """Blocking client; safe to share between threads."""

    def __init__(self, target: str = "localhost:50051", *, timeout: float = 30.0, max_message_mb: float = 64.0,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None,
                 encoding: str = "auto", connections: int = CONNECTIONS) -> None:
        """`encoding`: how detect() sends images (dd.client.encoding); `auto` picks raw arrays for a
        local server (loopback or unix socket) and JPEG + zstd depth for a remote one. `connections`:
        at most this many TCP connections, so that calls from several threads spread over the server's
        frontends (CONNECTIONS)."""
        self.encoding = wire.resolve(encoding, target)
        self._conns = _Connections(grpc.secure_channel if credentials else grpc.insecure_channel, target,
                                   credentials, _channel_options(max_message_mb), connections)
        self.channel = self._conns.channels[0]  # for callers that wait on or inspect one channel
        self.stub = self._conns.stubs[0]
        self.target = target
        self.timeout = timeout
        self.metadata = _metadata(token)

    def __enter__(self) -> "DetectorClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._conns.channels:
            channel.close()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Waits until a connection to the server is up; DetectionError (UNAVAILABLE) if none within `timeout`."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise DetectionError(grpc.StatusCode.UNAVAILABLE, f"failed to connect within {timeout:g} s",
                                 target=self.target) from None

    def make_request(self, color: ImageLike, depth: ImageLike | None = None, **kwargs: object) -> pb.DetectRequest:
        """make_request in this client's encoding."""
        return make_request(color, depth, encoding=self.encoding, **kwargs)  # type: ignore[arg-type]

    def detect(self, color: ImageLike, depth: ImageLike | None = None, *, timeout: float | None = None,
               **kwargs: object) -> Result:
        return self.detect_request(self.make_request(color, depth, **kwargs), timeout=timeout)

    def detect_request(self, request: pb.DetectRequest, timeout: float | None = None, *,
                       trace: bool = False) -> Result:
        """`trace`: fill Result.trace with the request's hops (for latency work on the server's host)."""
        i = self._conns.acquire()
        try:
            if not trace:
                resp = self._conns.stubs[i].Detect(request, timeout=timeout or self.timeout, metadata=self.metadata)
                return Result.from_proto(resp)
            sent = time.time()
            resp, call = self._conns.stubs[i].Detect.with_call(request, timeout=timeout or self.timeout,
                                                               metadata=_traced(self.metadata))
            return _with_trace(Result.from_proto(resp), sent, call.trailing_metadata())
        except grpc.RpcError as exc:
            raise _call_error(exc, request, self.target) from None
        finally:
            self._conns.release(i)

    def detect_stream(self, requests: Iterable[pb.DetectRequest], timeout: float | None = None) -> Iterator[Result]:
        """Results as they come (in any order; match them by request_id). A request that fails
        alone comes back as a Result with error_code/error_message; DetectionError ends the
        stream when the call itself fails (no server, no token, its deadline)."""
        i = self._conns.acquire()  # a stream is one call in flight on one connection, for as long as it lasts
        try:
            for resp in self._conns.stubs[i].DetectStream(iter(requests), timeout=timeout, metadata=self.metadata):
                yield Result.from_proto(resp)
        except grpc.RpcError as exc:
            raise DetectionError.from_rpc(exc, target=self.target) from None
        finally:
            self._conns.release(i)

    def list_models(self, timeout: float | None = None) -> list[pb.ModelInfo]:
        try:
            resp = self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout or self.timeout,
                                        metadata=self.metadata)
        except grpc.RpcError as exc:
            raise DetectionError.from_rpc(exc, target=self.target) from None
        return list(resp.models)


class AsyncDetectorClient:
    """asyncio client, for many concurrent requests from one thread.

    A program whose `asyncio.run` ends with an exception should call `gc.collect()` after it, before
    exiting: the exception's traceback holds the channels in a reference cycle, and gRPC releases
    (1.66 here) freeing them at interpreter exit can hang there (grpc/grpc#22365; the client command
    does so, dd.client.cli.release_grpc_aio).
    """

    def __init__(self, target: str = "localhost:50051", *, timeout: float = 30.0, max_message_mb: float = 64.0,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None,
                 encoding: str = "auto", connections: int = CONNECTIONS) -> None:
        """`encoding`: how detect() sends images (dd.client.encoding); `auto` picks raw arrays for a
        local server (loopback or unix socket) and JPEG + zstd depth for a remote one. `connections`:
        at most this many TCP connections, so that concurrent calls spread over the server's frontends
        (CONNECTIONS)."""
        self.encoding = wire.resolve(encoding, target)
        self._conns = _Connections(grpc.aio.secure_channel if credentials else grpc.aio.insecure_channel, target,
                                   credentials, _channel_options(max_message_mb), connections)
        self.channel = self._conns.channels[0]
        self.stub = self._conns.stubs[0]
        self.target = target
        self.timeout = timeout
        self.metadata = _metadata(token)

    async def __aenter__(self) -> "AsyncDetectorClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._conns.channels))

    def make_request(self, color: ImageLike, depth: ImageLike | None = None, **kwargs: object) -> pb.DetectRequest:
        """make_request in this client's encoding, in the calling thread."""
        return make_request(color, depth, encoding=self.encoding, **kwargs)  # type: ignore[arg-type]

    async def detect(self, color: ImageLike, depth: ImageLike | None = None, *, timeout: float | None = None,
                     **kwargs: object) -> Result:
        # Encoded off the event loop: a 1280x720 frame takes milliseconds (zstd 6, reading files for raw ~20).
        request = await asyncio.to_thread(self.make_request, color, depth, **kwargs)
        return await self.detect_request(request, timeout=timeout)

    async def detect_request(self, request: pb.DetectRequest, timeout: float | None = None, *,
                             trace: bool = False) -> Result:
        """`trace`: fill Result.trace with the request's hops (for latency work on the server's host)."""
        i = self._conns.acquire()
        try:
            if not trace:
                resp = await self._conns.stubs[i].Detect(request, timeout=timeout or self.timeout,
                                                         metadata=self.metadata)
                return Result.from_proto(resp)
            sent = time.time()
            call = self._conns.stubs[i].Detect(request, timeout=timeout or self.timeout,
                                               metadata=_traced(self.metadata))
            resp = await call
            return _with_trace(Result.from_proto(resp), sent, await call.trailing_metadata())
        except grpc.RpcError as exc:
            raise _call_error(exc, request, self.target) from None
        finally:
            self._conns.release(i)

    async def detect_stream(self, requests: AsyncIterator[pb.DetectRequest] | Iterable[pb.DetectRequest],
                            timeout: float | None = None) -> AsyncIterator[Result]:
        i = self._conns.acquire()
        try:
            async for resp in self._conns.stubs[i].DetectStream(requests, timeout=timeout, metadata=self.metadata):
                yield Result.from_proto(resp)
        except grpc.RpcError as exc:
            raise DetectionError.from_rpc(exc, target=self.target) from None
        finally:
            self._conns.release(i)

    async def list_models(self, timeout: float | None = None) -> list[pb.ModelInfo]:
        try:
            resp = await self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout or self.timeout,
                                              metadata=self.metadata)
        except grpc.RpcError as exc:
            raise DetectionError.from_rpc(exc, target=self.target) from None
        return list(resp.models)
