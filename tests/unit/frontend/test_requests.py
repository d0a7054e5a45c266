"""dd.frontend.requests: the protocol-free request path (admission, model, slot, decode, dispatch),
driven without gRPC or a proto: a real ring, and a stand-in for the worker side that records what
it was sent (the dispatcher's own tests are tests/integration/test_flow_control.py and test_reliability.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from dd.config import ModelConfig, ServerConfig
from dd.frontend.dispatcher import Reply
from dd.frontend.errors import ServeError, Status
from dd.frontend.inputs import MASKS_NONE, DetectionRequest, ImageInput, OutputRegion
from dd.frontend.requests import RequestPath
from dd.frontend.slots import SlotPool
from dd.ipc import messages
from dd.ipc.shm_ring import SHM_DIR, ShmRing, segment_name
from dd.png_rows import unfilter

TAG = "5107510752"  # a run tag no real run has


class Workers:
    """The dispatcher's side of the seam: records each InferRequest, answers with a fixed envelope,
    or holds the answer until `release` is set."""

    def __init__(self, ready: int = 1, error: str = "") -> None:
        self.sent: list[messages.InferRequest] = []
        self.ready, self.error = ready, error
        self.release: asyncio.Event | None = None
        self.gpu_jpeg = False  # what the workers' pongs say: they decode JPEGs on a GPU
        self.gpu_png_rows = False  # ... and reconstruct PNG depth rows on a GPU
        self.failures: list[tuple[str, BaseException]] = []  # what the request path counted as failed
        self._ids = 0

    def record_failure(self, model: str, exc: BaseException) -> None:
        self.failures.append((model, exc))

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def ready_workers(self, model: str) -> int:
        return self.ready

    def model_error(self, model: str) -> str:
        return self.error

    def decodes_jpeg_on_gpu(self, model: str) -> bool:
        return self.gpu_jpeg

    def unfilters_png_rows_on_gpu(self, model: str) -> bool:
        return self.gpu_png_rows

    async def submit_reply(self, req, deadline, rebind, give_up_at=None) -> Reply:
        self.sent.append(req)
        if self.release is not None:
            await self.release.wait()
        envelope = messages.InferReply(id=req.id, code="OK", queue_us=11, decode_us=req.decode_us,
                                       inference_us=33, encode_us=44, batch_size=2)
        return Reply("OK", "", f"answer {req.request_id}".encode(), envelope)


def model(name: str, kind: str = "rgb") -> ModelConfig:
    return ModelConfig(name=name, folder=Path("."), config_path=Path("node_config.json"), detection_type="x",
                       engine="null", input_kind=kind, weights=None, config_file=None, categories=("box",),
                       min_size=64, max_size=128)


@pytest.fixture
def ring():
    name = segment_name(TAG, "fe")
    (SHM_DIR / name).unlink(missing_ok=True)
    r = ShmRing.create(name, slots=2, slot_bytes=1 << 16)
    yield r
    r.close()
    r.unlink()


def path_for(ring: ShmRing, workers: Workers, **cfg) -> RequestPath:
    models = {"rgb": model("rgb"), "rgbd": model("rgbd", "rgbd")}
    return RequestPath(models, "rgbd", ServerConfig(**cfg), ring, SlotPool(ring), workers)


def png(shape: tuple[int, ...], dtype=np.uint8) -> bytes:
    return cv2.imencode(".png", np.full(shape, 7, dtype))[1].tobytes()


def rgb_request(**kw) -> DetectionRequest:
    return DetectionRequest(protocol="test_v0", model="rgb", color=ImageInput(png((24, 32, 3))), **kw)


def test_a_request_is_decoded_into_a_slot_and_dispatched_with_every_field(ring: ShmRing) -> None:
    workers = Workers()
    path = path_for(ring, workers)
    pixels = np.arange(24 * 32 * 3, dtype=np.uint8).reshape(24, 32, 3)
    depth = np.full((24, 32), 1500, np.uint16)
    request = DetectionRequest(
        protocol="test_v0", model="", request_id="r-1", score_threshold=0.25, mask_format=MASKS_NONE,
        color=ImageInput(pixels.tobytes(), "raw", (24, 32, 3), "uint8"), depth=ImageInput(cv2.imencode(".png", depth)[1].tobytes()),
        model_version="3", outputs=["boxes", "scores"], output_regions=[OutputRegion("boxes", "/k", 8, 64)])

    outcome = asyncio.run(path.run(request, 30.0))

    assert outcome.body == b"answer r-1"
    assert (outcome.timings.queue_us, outcome.timings.inference_us, outcome.timings.encode_us,
            outcome.timings.batch_size) == (11, 33, 44, 2)
    (sent,) = workers.sent
    assert sent.model == "rgbd" and sent.protocol == "test_v0" and sent.request_id == "r-1"  # the default model
    assert sent.mask_format == MASKS_NONE and sent.score_threshold == pytest.approx(0.25)
    assert sent.model_version == "3" and list(sent.outputs) == ["boxes", "scores"]
    assert [(r.output, r.shm_key, r.offset, r.byte_size) for r in sent.output_regions] == [("boxes", "/k", 8, 64)]
    assert sent.has_depth and list(sent.color.shape) == [24, 32, 3] and sent.depth.dtype == "uint16"
    assert 0 < sent.deadline - time.time() <= 30.0
    buf = ring.slot_buffer(sent.slot)
    assert np.array_equal(np.ndarray((24, 32, 3), np.uint8, buffer=buf, offset=sent.color.offset), pixels)
    assert np.array_equal(np.ndarray((24, 32), np.uint16, buffer=buf, offset=sent.depth.offset), depth)
    assert path.pending == 0
    path.close()


@pytest.mark.parametrize("request_kw, status, words", [
    ({"model": "nope"}, Status.NOT_FOUND, "model 'nope' is not served here; served: rgb, rgbd"),
    ({"score_threshold": 1.5}, Status.INVALID_ARGUMENT, "score_threshold must be in [0, 1]"),
    ({"mask_format": 7}, Status.INVALID_ARGUMENT, "unknown mask_format 7"),
    ({"request_id": "x" * 200}, Status.INVALID_ARGUMENT, "request_id is 200 bytes; at most 128"),
    ({"color": ImageInput(b"not an image")}, Status.INVALID_ARGUMENT, "color: not a JPEG, PNG"),
    ({"model": "rgbd"}, Status.INVALID_ARGUMENT, "this model is RGB-D and needs depth"),
])
def test_a_bad_request_fails_with_a_status_and_reaches_no_worker(ring: ShmRing, request_kw, status, words) -> None:
    workers = Workers()
    path = path_for(ring, workers, max_request_id_bytes=128)
    kw = {"model": "rgb", **request_kw}
    request = DetectionRequest(protocol="test_v0", color=kw.pop("color", ImageInput(png((24, 32, 3)))), **kw)
    with pytest.raises(ServeError) as err:
        asyncio.run(path.run(request, 30.0))
    assert err.value.status == status and words in err.value.message
    assert workers.sent == [] and path.pending == 0
    # Counted once, as failed, under the model's name; a name not served is counted as "" (metrics).
    assert workers.failures == [("" if kw["model"] == "nope" else kw["model"], err.value)]
    path.close()


def test_an_answered_request_is_not_counted_as_failed_and_a_cancelled_one_is(ring: ShmRing) -> None:
    workers = Workers()
    path = path_for(ring, workers)

    async def go() -> None:
        await path.run(rgb_request(), 30.0)
        assert workers.failures == []
        workers.release = asyncio.Event()  # the next request waits at the worker: cancel it there
        task = asyncio.create_task(path.run(rgb_request(), 30.0))
        while not workers.sent[1:]:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert [(m, type(e)) for m, e in workers.failures] == [("rgb", asyncio.CancelledError)]
    path.close()


def test_admission_refuses_past_max_pending_and_held_bytes_and_when_stopping(ring: ShmRing) -> None:
    workers = Workers()
    path = path_for(ring, workers, max_pending=2, max_held_response_mb=1)

    async def go() -> None:
        path.hold(b"x")  # a finished response a stream has not written: counts like a request
        path.hold(b"y")
        with pytest.raises(ServeError) as err:
            await path.run(rgb_request(), 30.0)
        assert err.value.status == Status.RESOURCE_EXHAUSTED and "max_pending" in err.value.message
        path.release(b"x")
        path.release(b"y")
        big = bytes(2 << 20)
        path.hold(big)
        with pytest.raises(ServeError) as err:
            await path.run(rgb_request(), 30.0)
        assert err.value.status == Status.RESOURCE_EXHAUSTED and "max_held_response_mb" in err.value.message
        path.release(big)
        assert (path.pending, path.held_bytes) == (0, 0)
        assert (await path.run(rgb_request(request_id="ok"), 30.0)).body == b"answer ok"
        path.stopping = True
        with pytest.raises(ServeError) as err:
            await path.run(rgb_request(), 30.0)
        assert err.value.status == Status.UNAVAILABLE

    asyncio.run(go())
    path.close()


def test_a_request_counts_as_pending_while_a_worker_has_it(ring: ShmRing) -> None:
    workers = Workers()
    path = path_for(ring, workers, max_pending=1)

    async def go() -> None:
        workers.release = asyncio.Event()
        first = asyncio.create_task(path.run(rgb_request(request_id="a"), 30.0))
        while not workers.sent:  # until the worker side has it: no timing assumed
            await asyncio.sleep(0.01)
        assert path.pending == 1
        with pytest.raises(ServeError) as err:
            await path.run(rgb_request(), 30.0)
        assert err.value.status == Status.RESOURCE_EXHAUSTED
        workers.release.set()
        assert (await first).body == b"answer a"
        assert path.pending == 0

    asyncio.run(go())
    path.close()


def test_a_model_that_failed_to_load_is_unavailable_with_its_reason(ring: ShmRing) -> None:
    path = path_for(ring, Workers(ready=0, error="CUDA out of memory"))
    with pytest.raises(ServeError) as err:
        asyncio.run(path.run(rgb_request(), 30.0))
    assert err.value.status == Status.UNAVAILABLE and "failed to load: CUDA out of memory" in err.value.message
    path.close()


@pytest.mark.parametrize("policy, gpu_jpeg, compressed", [
    ("auto", True, True), ("auto", False, False), ("frontend", True, False), ("worker", False, True)])
def test_jpeg_decode_decides_whether_a_jpeg_travels_compressed(ring: ShmRing, policy: str, gpu_jpeg: bool,
                                                               compressed: bool) -> None:
    workers = Workers()
    workers.gpu_jpeg = gpu_jpeg
    path = path_for(ring, workers, jpeg_decode=policy)
    data = cv2.imencode(".jpg", (np.arange(24 * 32 * 3) % 251).astype(np.uint8).reshape(24, 32, 3))[1].tobytes()
    asyncio.run(path.run(DetectionRequest(protocol="test_v0", model="rgb", color=ImageInput(data)), 30.0))
    (sent,) = workers.sent
    assert list(sent.color.shape) == [24, 32, 3] and sent.color.dtype == "uint8"
    if compressed:
        assert (sent.color.encoding, sent.color.nbytes) == ("jpeg", len(data))
        assert bytes(ring.slot_buffer(sent.slot)[:len(data)]) == data
    else:
        assert (sent.color.encoding, sent.color.nbytes) == ("", 0)
    path.close()


@pytest.mark.parametrize("gpu_png_rows", [True, False])
def test_a_depth_png_travels_as_rows_when_the_workers_reconstruct_them(ring: ShmRing, gpu_png_rows: bool) -> None:
    workers = Workers()
    workers.gpu_png_rows = gpu_png_rows
    path = path_for(ring, workers)
    depth = (np.arange(24 * 32) * 37 % 65536).astype(np.uint16).reshape(24, 32)
    request = DetectionRequest(protocol="test_v0", model="rgbd", color=ImageInput(png((24, 32, 3))),
                               depth=ImageInput(cv2.imencode(".png", depth)[1].tobytes()))
    asyncio.run(path.run(request, 30.0))
    (sent,) = workers.sent
    assert list(sent.depth.shape) == [24, 32] and sent.depth.dtype == "uint16"
    buf = ring.slot_buffer(sent.slot)
    if gpu_png_rows:
        assert (sent.depth.encoding, sent.depth.nbytes) == ("png_rows", 24 * (1 + 2 * 32))
        rows = np.ndarray((24, 65), np.uint8, buffer=buf, offset=sent.depth.offset)
        assert np.array_equal(unfilter(rows, 24, 32), depth)
    else:
        assert (sent.depth.encoding, sent.depth.nbytes) == ("", 0)
        assert np.array_equal(np.ndarray((24, 32), np.uint16, buffer=buf, offset=sent.depth.offset), depth)
    path.close()
