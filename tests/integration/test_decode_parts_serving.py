"""Images the client library writes, served by a real server that decodes them in parts
(--decode-parts 3): every answer is the answer to the same images written by OpenCV, decoded whole.

Restart markers change how a JPEG's coefficients are entropy-coded, not the coefficients: at the same
quality and subsampling both JPEGs hold the same pixels; the PNGs are lossless. So the answers must be
equal byte for byte, and `rows` (an engine that takes PNG rows, tests/png_rows_probe_engine.py) must have
received the rows of both depth PNGs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import cv2
import grpc
import numpy as np
import pytest

from dd.client import make_request
from dd.proto.deep_detection.v1 import detector_pb2 as pb
from dd.proto.deep_detection.v1 import detector_pb2_grpc as pb_grpc
from dd.synth.scenes import generate_scene
from tests.faults import write_model_folders
from tests.serverproc import ServerProcess

H, W = 480, 640


def _repo(root: Path) -> Path:
    return write_model_folders(root, {
        "rows": {"DETECTION_TYPE": "RGBDPngRowsProbe", "ENGINE": "tests.png_rows_probe_engine:RowsProbe",
                 "ENGINE_OPTIONS": {"record": str(root / "rows.log"), "instances": 5}},
        "rgb": {"DETECTION_TYPE": "RGBNullServicer", "ENGINE_OPTIONS": {"instances": 5}}})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    repo = _repo(tmp_path_factory.mktemp("parts") / "models")
    srv = ServerProcess(repo, args=["--decode-parts", "3", "--slot-mb", "8"]).start()
    try:
        srv.wait_workers_ready({"rows": 1, "rgb": 1})
        yield srv, repo
    finally:
        srv.stop()


def _answer(srv: ServerProcess, model: str, request: pb.DetectRequest) -> list[bytes]:
    request.model = model
    request.mask_format = pb.RLE
    with grpc.insecure_channel(srv.target) as ch:
        resp = pb_grpc.DetectorStub(ch).Detect(request, timeout=60)
    assert (resp.height, resp.width) == (H, W) and len(resp.instances) == 5
    return [i.SerializeToString() for i in resp.instances]


def test_the_client_librarys_images_answer_as_opencvs(server) -> None:
    srv, repo = server
    for seed in range(3):
        scene = generate_scene(seed, W, H)
        library = make_request(scene.color, scene.depth, encoding="jpeg+png")
        assert library.color.data.count(b"\xff\xd0") >= 1  # restart markers
        opencv = pb.DetectRequest(
            color=pb.Image(data=cv2.imencode(".jpg", scene.color[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()),
            depth=pb.Image(data=cv2.imencode(".png", scene.depth)[1].tobytes()))
        assert library.color.data != opencv.color.data and library.depth.data != opencv.depth.data
        assert _answer(srv, "rows", library) == _answer(srv, "rows", opencv), seed
        rgb_library = make_request(scene.color, encoding="jpeg+png")
        rgb_opencv = pb.DetectRequest(color=opencv.color)
        assert _answer(srv, "rgb", rgb_library) == _answer(srv, "rgb", rgb_opencv), seed
    assert set((repo / "rows.log").read_text().split()) == {"rows"}


def test_a_client_library_jpeg_with_damaged_data_is_refused_or_answered_as_whole(server) -> None:
    """Bytes changed inside one strip: the server answers as it does for the same bytes decoded whole
    (libjpeg decodes damaged data with warnings), or refuses both alike."""
    srv, _ = server
    scene = generate_scene(7, W, H)
    data = bytearray(make_request(scene.color, encoding="jpeg+png").color.data)
    middle = len(data) // 2
    data[middle:middle + 40] = bytes(40)
    damaged = bytes(data)
    cut = cv2.imdecode(np.frombuffer(damaged, np.uint8), cv2.IMREAD_COLOR)
    if cut is None:
        with pytest.raises(grpc.RpcError) as err:
            _answer(srv, "rgb", pb.DetectRequest(color=pb.Image(data=damaged)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return
    raw = pb.DetectRequest(color=pb.Image(data=cut[:, :, ::-1].tobytes(), encoding=pb.Image.RAW, shape=[H, W, 3],
                                          dtype=pb.UINT8))
    assert _answer(srv, "rgb", pb.DetectRequest(color=pb.Image(data=damaged))) == _answer(srv, "rgb", raw)
