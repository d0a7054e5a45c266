"""JPEGs decoded by the worker (ServerConfig.jpeg_decode, issue #18): real servers, real rings.

Two servers hold the same models, one with `--jpeg-decode worker`, one with `--jpeg-decode frontend`.
With CPU decoding on both sides (OpenCV, the same flags), every answer must be the same bytes but for
the timings, whichever side decoded; the probe engine (tests/jpeg_probe_engine.py) records which side
that was, so the comparison cannot pass by both servers decoding in the frontend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import cv2
import grpc
import numpy as np
import pytest

from dd.frontend.dispatcher import Dispatcher, WorkerLink
from dd.proto.deep_detection.v1 import detector_pb2 as pb
from dd.proto.deep_detection.v1 import detector_pb2_grpc as pb_grpc
from tests.conftest import scene
from tests.jpeg_samples import exif_rotated, jpeg, photo
from tests.faults import write_model_folders
from tests.serverproc import ServerProcess


def _png(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(arr, cv2.COLOR_RGB2BGR) if arr.ndim == 3 else arr)
    assert ok
    return buf.tobytes()


# name -> (color bytes, whether the worker server sends it compressed)
COLORS = {
    "baseline-420": (lambda: jpeg(photo(1)), True),
    "baseline-444": (lambda: jpeg(photo(2), subsampling=0, quality=95), True),
    "exif-rotated": (lambda: exif_rotated(photo(3)), True),
    "progressive": (lambda: jpeg(photo(4), progressive=True), False),
    "grayscale": (lambda: jpeg(photo(5), mode="L"), False),
    "png": (lambda: _png(photo(6)), False),
}


def _repo(root: Path) -> Path:
    return write_model_folders(root, {
        "probe": {"DETECTION_TYPE": "RGBJpegProbe", "ENGINE": "tests.jpeg_probe_engine:JpegProbe",
                  "ENGINE_OPTIONS": {"record": str(root / "probe.log"), "record_load": str(root / "load.log"),
                                     "instances": 9}},
        "null": {"DETECTION_TYPE": "RGBDNullServicer", "ENGINE_OPTIONS": {"instances": 9}}})


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[ServerProcess, Path]]]:
    base = tmp_path_factory.mktemp("jpeg")
    out: dict[str, tuple[ServerProcess, Path]] = {}
    try:
        for policy in ("worker", "frontend"):
            repo = _repo(base / policy)
            out[policy] = (ServerProcess(repo, args=["--jpeg-decode", policy]).start(), repo)
        for srv, _ in out.values():
            srv.wait_workers_ready({"probe": 1, "null": 1})
        yield out
    finally:
        for srv, _ in out.values():
            srv.stop()


def _detect(srv: ServerProcess, req: pb.DetectRequest) -> pb.DetectResponse:
    with grpc.insecure_channel(srv.target) as ch:
        resp = pb_grpc.DetectorStub(ch).Detect(req, timeout=60)
    resp.ClearField("timing")  # the only part that may differ: how long things took
    return resp


def test_worker_decoding_gives_the_frontends_answers(servers) -> None:
    for name, (make, _) in COLORS.items():
        data = make()
        answers = {p: _detect(srv, pb.DetectRequest(model="probe", color=pb.Image(data=data), request_id=name))
                   for p, (srv, _) in servers.items()}
        assert answers["worker"].SerializeToString() == answers["frontend"].SerializeToString(), name
        assert len(answers["worker"].instances) == 9
        # Pixels as stored, EXIF orientation ignored on both sides (the depth is registered to them).
        assert (answers["worker"].height, answers["worker"].width) == (120, 160), name


def test_the_worker_server_sent_the_jpegs_compressed(servers) -> None:
    """What each probe engine was given, request by request: the JPEGs the worker decodes as the
    frontend would went compressed; PNG, progressive and grayscale JPEGs as pixels."""
    for policy, (srv, repo) in servers.items():
        log = repo / "probe.log"
        log.unlink(missing_ok=True)
        for name, (make, _) in COLORS.items():
            _detect(srv, pb.DetectRequest(model="probe", color=pb.Image(data=make())))
        seen = log.read_text().split()
        expected = ["jpeg" if policy == "worker" and compressed else "pixels" for _, compressed in COLORS.values()]
        assert seen == expected, policy


def test_the_engine_knows_at_load_whether_jpegs_reach_it(servers) -> None:
    """With jpeg_decode frontend no JPEG reaches the engine, and its warm-up may leave nvJPEG out (the fast
    engine's `_warm_compressed`); with worker (and auto) it must not."""
    for policy, (_, repo) in servers.items():
        assert (repo / "load.log").read_text().split() == [f"receives_jpeg={policy != 'frontend'}"], policy


def test_rgbd_with_a_compressed_color_and_an_engine_that_does_not_decode(servers) -> None:
    """The null engine does not decode JPEGs: the worker's core does, before it; the depth sits in
    the slot where it always does, after the color's decoded size."""
    for seed in range(3):
        color, depth = scene(seed)
        req = pb.DetectRequest(model="null", color=pb.Image(data=jpeg(color, quality=80)),
                               depth=pb.Image(data=_png(depth)))
        answers = [_detect(srv, req) for srv, _ in servers.values()]
        assert answers[0].SerializeToString() == answers[1].SerializeToString()
        assert len(answers[0].instances) == 9


def test_a_bad_jpeg_is_refused_on_both_paths(servers) -> None:
    data = jpeg(photo(7))
    for srv, _ in servers.values():
        with pytest.raises(grpc.RpcError) as err:
            _detect(srv, pb.DetectRequest(model="probe", color=pb.Image(data=data[:-200])))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "truncated" in err.value.details()


@pytest.mark.parametrize("capability, asks", [("gpu_jpeg", "decodes_jpeg_on_gpu"),
                                               ("gpu_png_rows", "unfilters_png_rows_on_gpu")])
def test_compressed_inputs_go_only_when_every_ready_worker_takes_them_on_a_gpu(capability: str, asks: str) -> None:
    """JPEGs (jpeg_decode auto) and PNG rows go to the workers only where each ready one says it takes them."""
    def link(model: str, ready: bool, takes: bool) -> WorkerLink:
        made = WorkerLink(model, 0, Path("/nonexistent"), None, 8)  # type: ignore[arg-type]
        made.ready = made.connected = ready
        setattr(made, capability, takes)
        return made

    d = Dispatcher.__new__(Dispatcher)
    d.links = {}
    ask = getattr(d, asks)
    assert not ask("m")  # no worker yet
    d.links = {Path("a"): link("m", True, True), Path("b"): link("other", True, False)}
    assert ask("m")
    d.links[Path("c")] = link("m", True, False)  # a CPU worker of the same model may get a retry
    assert not ask("m")
    d.links[Path("c")] = link("m", False, False)  # ... unless it is not ready
    assert ask("m")


def test_the_worker_reads_a_compressed_color_in_place_and_checks_its_reference() -> None:
    from dd.config import ConfigError, load_server_config
    from dd.ipc import messages
    from dd.ipc.shm_ring import SHM_DIR, RingError, ShmRing, segment_name
    from dd.worker.engines.base import EncodedImage
    from dd.worker.server import _color

    with pytest.raises(ConfigError, match="jpeg_decode must be one of auto, frontend, worker"):
        load_server_config(None, {"jpeg_decode": "gpu"})
    name = segment_name("feedc0ffe1", "fe")
    (SHM_DIR / name).unlink(missing_ok=True)
    ring = ShmRing.create(name, slots=2, slot_bytes=10_000)
    try:
        data = jpeg(photo(8)[:40, :50].copy())
        ring.slot_buffer(1)[:len(data)] = data
        ref = messages.ArrayRef(offset=0, shape=[40, 50, 3], dtype="uint8", encoding="jpeg", nbytes=len(data))
        img = _color(ring, 1, ref)
        assert isinstance(img, EncodedImage) and (img.height, img.width) == (40, 50)
        assert img.data.tobytes() == data
        ring.slot_buffer(1)[0] = 0  # a view of the slot, not a copy
        assert img.data[0] == 0
        with pytest.raises(RingError):  # past the slot's end
            _color(ring, 1, messages.ArrayRef(shape=[40, 50, 3], dtype="uint8", encoding="jpeg", nbytes=20_000))
        with pytest.raises(ValueError, match="decode to"):
            _color(ring, 1, messages.ArrayRef(shape=[40, 50], dtype="uint8", encoding="jpeg", nbytes=10))
        with pytest.raises(ValueError, match="not known"):
            _color(ring, 1, messages.ArrayRef(shape=[40, 50, 3], dtype="uint8", encoding="webp", nbytes=10))
        del img
    finally:
        ring.close()
        ring.unlink()
