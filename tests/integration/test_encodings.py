"""ZSTD images (a raw array compressed with Zstandard) and the client's choice of encoding per link.

The frontend must put exactly the RAW bytes into the slot, and refuse any frame that would make it
write, allocate or decompress more than shape x dtype bytes; the client must pick raw arrays for a
local server and JPEG + zstd for a remote one, and explain a refusal by a server that predates ZSTD.
"""

from __future__ import annotations

from concurrent import futures
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
import zstandard

from dd.client import DetectionError, DetectorClient, make_request
from dd.client.encoding import is_local, resolve
from dd.frontend.decode import decode_into_slot
from dd.frontend.errors import ServeError, Status
from dd.frontend.protocols.detector_v1 import image_inputs
from dd.proto.deep_detection.v1 import detector_pb2 as pb
from dd.proto.deep_detection.v1 import detector_pb2_grpc as pb_grpc
from tests.faults import Case, Server, answer_problem, detect, null_model

H, W = 72, 128
RNG = np.random.default_rng(18)
COLOR = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
DEPTH = RNG.integers(0, 5000, (H, W), dtype=np.uint16)
DEPTH_M = (DEPTH / 1000.0).astype(np.float32)
_DT = {np.dtype(np.uint8): pb.UINT8, np.dtype(np.uint16): pb.UINT16, np.dtype(np.float32): pb.FLOAT32}


def zstd(arr: np.ndarray, data: bytes | None = None, shape: list[int] | None = None, **compressor) -> pb.Image:
    if data is None:
        data = zstandard.ZstdCompressor(**compressor).compress(arr.tobytes())
    return pb.Image(data=data, encoding=pb.Image.ZSTD, shape=list(arr.shape) if shape is None else shape,
                    dtype=_DT[arr.dtype])


def raw(arr: np.ndarray) -> pb.Image:
    return pb.Image(data=arr.tobytes(), encoding=pb.Image.RAW, shape=list(arr.shape), dtype=_DT[arr.dtype])


def decode(color: pb.Image, depth: pb.Image | None = None) -> tuple[bytes, object]:
    req = pb.DetectRequest(color=color)
    if depth is not None:
        req.depth.CopyFrom(depth)
    slot = memoryview(bytearray(H * W * 8 + 4096))
    decoded = decode_into_slot(*image_inputs(req), depth is not None, slot, 10**6)
    return bytes(slot), decoded


def refusal(color: pb.Image, depth: pb.Image | None = None) -> str:
    with pytest.raises(ServeError) as err:
        decode(color, depth)
    assert err.value.status == Status.INVALID_ARGUMENT
    return err.value.message


# -- the frontend's decoding, in-process -------------------------------------------------------

@pytest.mark.parametrize("depth", [DEPTH, DEPTH_M], ids=["uint16-mm", "float32-m"])
def test_zstd_puts_the_raw_bytes_into_the_slot(depth: np.ndarray) -> None:
    want_slot, want = decode(raw(COLOR), raw(depth))
    got_slot, got = decode(zstd(COLOR), zstd(depth))
    assert got == want
    assert got_slot == want_slot
    # A frame without its content size (a streaming compressor's) is served the same.
    assert decode(zstd(COLOR, write_content_size=False), zstd(depth, write_content_size=False))[0] == want_slot
    # ZSTD color beside a PNG depth, and a JPEG color beside ZSTD depth.
    png = pb.Image(data=cv2.imencode(".png", DEPTH)[1].tobytes())
    assert decode(zstd(COLOR), png)[0] == decode(raw(COLOR), raw(DEPTH))[0]
    jpeg = pb.Image(data=cv2.imencode(".jpg", COLOR)[1].tobytes())
    assert decode(jpeg, zstd(depth))[0] == decode(jpeg, raw(depth))[0]


def test_zstd_depth_beside_a_jpeg_the_worker_decodes() -> None:
    """With --jpeg-decode worker the JPEG goes into the slot compressed; ZSTD depth lands after it as usual."""
    jpeg = pb.Image(data=cv2.imencode(".jpg", COLOR)[1].tobytes())
    slot = memoryview(bytearray(H * W * 8 + 4096))
    color, _ = image_inputs(pb.DetectRequest(color=jpeg))
    depth = image_inputs(pb.DetectRequest(depth=zstd(DEPTH)))[1]
    decoded = decode_into_slot(color, depth, True, slot, 10**6, jpeg_to_worker=True)
    assert decoded.color.encoding == "jpeg" and bytes(slot[:decoded.color.nbytes]) == jpeg.data
    placed = np.ndarray((H, W), np.uint16, buffer=slot, offset=decoded.depth.offset)
    assert np.array_equal(placed, DEPTH)


def test_zstd_frames_that_are_not_shape_times_dtype_are_refused() -> None:
    big = np.zeros((H * 100, W), np.uint16)  # 100 times the announced array
    assert "ZSTD frame holds 1843200 bytes but shape [72, 128] x uint16 needs 18432" in refusal(
        raw(COLOR), zstd(DEPTH, data=zstandard.ZstdCompressor().compress(big.tobytes())))
    # The same bomb without a declared size: stopped at shape x dtype bytes, never decompressed whole.
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(64 << 20))
    assert len(bomb) < 64 << 10
    msg = refusal(raw(COLOR), zstd(DEPTH, data=bomb))
    assert "the ZSTD frame asks for a window larger than its array" in msg, msg
    small = zstandard.ZstdCompressor(write_content_size=False).compress(DEPTH[: H // 2].tobytes())
    assert "holds 9216 bytes but shape [72, 128] x uint16 needs 18432; it is truncated" in refusal(
        raw(COLOR), zstd(DEPTH, data=small))
    frame = zstandard.ZstdCompressor().compress(DEPTH.tobytes())
    assert "more than shape [72, 128] x uint16" in refusal(raw(COLOR), zstd(DEPTH, data=frame + frame))
    assert "it is truncated" in refusal(raw(COLOR), zstd(DEPTH, data=frame[:-9]))
    assert "not a Zstandard frame" in refusal(raw(COLOR), zstd(DEPTH, data=b"\x89PNG\r\n\x1a\n" + bytes(40)))
    assert "needs depth" in refusal(raw(COLOR), zstd(DEPTH, data=b""))
    assert "ZSTD frame holds 18432 bytes but shape [72, 64] x uint16 needs 9216" in refusal(
        raw(COLOR), zstd(DEPTH, shape=[H, W // 2]))
    assert "depth is 64x72 but color is 128x72" in refusal(
        raw(COLOR), zstd(DEPTH[:, : W // 2].copy()))
    assert "RAW color must be shape [H, W, 3] with dtype UINT8" in refusal(zstd(DEPTH))
    assert "NaN or infinity" in refusal(raw(COLOR), zstd(np.full((H, W), np.nan, np.float32)))


def test_zstd_frame_asking_for_a_large_window_is_refused() -> None:
    """A frame may make its decoder allocate its window: at most the array's size (rounded up to a
    power of two) is allowed, whatever the frame says."""
    params = zstandard.ZstdCompressionParameters(window_log=27, write_content_size=False)
    stream = zstandard.ZstdCompressor(compression_params=params).compressobj()  # size unknown: window kept
    frame = stream.compress(DEPTH.tobytes()) + stream.flush()
    assert zstandard.get_frame_parameters(frame).window_size == 2**27
    assert "depth: the ZSTD frame asks for a window larger than its array (18432 bytes" in refusal(
        raw(COLOR), zstd(DEPTH, data=frame))


# -- the client's choice -------------------------------------------------------------------------

@pytest.mark.parametrize("target,local", [
    ("localhost:50051", True), ("127.0.0.1:50051", True), ("127.3.4.5:1", True), ("[::1]:50051", True),
    ("unix:/tmp/dd.sock", True), ("unix:///run/dd.sock", True), ("unix-abstract:dd", True),
    ("ipv4:127.0.0.1:50051", True), ("dns:///localhost:50051", True), ("ipv6:[::1]:50051", True),
    ("10.0.0.7:50051", False), ("detector.local:50051", False), ("dns:///example.com:443", False),
    ("[2001:db8::1]:50051", False), ("192.168.1.20", False), ("localhost.example.com:1", False)])
def test_auto_picks_raw_for_a_local_server_only(target: str, local: bool) -> None:
    assert is_local(target) is local
    assert resolve("auto", target) == ("raw" if local else "jpeg+zstd")
    assert resolve("jpeg+png", target) == "jpeg+png"
    with DetectorClient(target) as client:
        assert client.encoding == ("raw" if local else "jpeg+zstd")
        req = client.make_request(COLOR, DEPTH)
    if local:
        assert (req.color.encoding, req.depth.encoding) == (pb.Image.RAW, pb.Image.RAW)
        assert req.color.data == COLOR.tobytes() and req.depth.data == DEPTH.tobytes()
    else:
        assert (req.color.encoding, req.depth.encoding) == (pb.Image.ENCODED, pb.Image.ZSTD)
        assert req.color.data[:3] == b"\xff\xd8\xff"
        assert zstandard.ZstdDecompressor().decompress(req.depth.data) == DEPTH.tobytes()


def test_unknown_encoding_is_refused_by_the_client() -> None:
    with pytest.raises(ValueError, match="unknown encoding 'png'; choose one of auto, raw"):
        DetectorClient("localhost:1", encoding="png")


def test_each_encoding_of_arrays_and_files(tmp_path: Path) -> None:
    color_file, depth_file = tmp_path / "c.jpg", tmp_path / "d.png"
    color_file.write_bytes(cv2.imencode(".jpg", COLOR[:, :, ::-1])[1].tobytes())
    depth_file.write_bytes(cv2.imencode(".png", DEPTH)[1].tobytes())

    def kinds(req: pb.DetectRequest) -> tuple[int, int]:
        return req.color.encoding, req.depth.encoding

    assert kinds(make_request(COLOR, DEPTH)) == (pb.Image.RAW, pb.Image.RAW)  # as-is, the old default
    assert kinds(make_request(color_file, depth_file)) == (pb.Image.ENCODED, pb.Image.ENCODED)
    assert kinds(make_request(COLOR, DEPTH, encoding="jpeg+png")) == (pb.Image.ENCODED, pb.Image.ENCODED)
    assert kinds(make_request(COLOR, DEPTH_M, encoding="jpeg+png")) == (pb.Image.ENCODED, pb.Image.RAW)
    req = make_request(color_file, depth_file, encoding="raw")  # decoded by the client, as the server would
    assert kinds(req) == (pb.Image.RAW, pb.Image.RAW)
    assert req.color.data == cv2.imread(str(color_file))[:, :, ::-1].tobytes()
    assert req.depth.data == DEPTH.tobytes() and list(req.depth.shape) == [H, W]
    req = make_request(color_file, depth_file, encoding="jpeg+zstd")  # color as it is, depth recompressed
    assert kinds(req) == (pb.Image.ENCODED, pb.Image.ZSTD)
    assert req.color.data == color_file.read_bytes()
    assert zstandard.ZstdDecompressor().decompress(req.depth.data) == DEPTH.tobytes()
    # What the client cannot decode goes as it is, for the server to explain.
    assert kinds(make_request(b"not an image", b"nor this", encoding="raw")) == (pb.Image.ENCODED, pb.Image.ENCODED)


@pytest.mark.parametrize("h, w", [(720, 1280), (97, 131)])
def test_the_clients_jpegs_restart_at_every_mcu_row_and_decode_in_strips(h: int, w: int) -> None:
    """The client library's JPEG: a restart marker at each 16-pixel row, so the server may decode it in
    strips (dd.frontend.jpeg_strips), to the pixels of one decode."""
    from concurrent.futures import ThreadPoolExecutor

    from dd.frontend.jpeg_strips import decode_in_strips, restart_layout
    from tests.conftest import scene

    color, depth = scene(5, h=h, w=w)
    data = make_request(color, depth, encoding="jpeg+png").color.data
    layout = restart_layout(data)
    assert layout is not None and layout.mcu_height == 16 and sorted(layout.row_segment) == list(range(-(-h // 16)))
    whole = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    out = np.zeros_like(whole)
    with ThreadPoolExecutor(2) as pool:
        assert decode_in_strips(data, layout, out, 3, pool)
    assert np.array_equal(out, whole)
    plain = cv2.imencode(".jpg", color[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
    assert len(data) - len(plain) <= 8 * -(-h // 16)  # the cost: a marker, its padding, the DC values anew


class _OldServer(pb_grpc.DetectorServicer):
    """Answers as servers before ZSTD did (dd/frontend/decode.py, session 5)."""

    def Detect(self, request: pb.DetectRequest, context: grpc.ServicerContext) -> pb.DetectResponse:
        for what, img in (("color", request.color), ("depth", request.depth)):
            if img.encoding not in (pb.Image.ENCODED, pb.Image.RAW):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"{what}: unknown encoding {img.encoding}; use ENCODED (0) or RAW (1)")
        return pb.DetectResponse(height=H, width=W)


def test_a_server_that_predates_zstd_is_named_with_what_to_do() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_DetectorServicer_to_server(_OldServer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with DetectorClient(f"127.0.0.1:{port}", encoding="jpeg+zstd") as client:
            with pytest.raises(DetectionError) as err:
                client.detect(COLOR, DEPTH)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "depth: unknown encoding 2" in err.value.details()
            assert "this server predates ZSTD images: upgrade the server, or send PNG depth " \
                   "(encoding='jpeg+png'" in err.value.details()
        with DetectorClient(f"127.0.0.1:{port}", encoding="jpeg+png") as client:
            assert client.detect(COLOR, DEPTH).width == W
    finally:
        server.stop(0)


# -- through a real server ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("encodings")
    null_model(root / "rgbd", kind="rgbd", instances=16)
    srv = Server(root, slot_mb=4).start()
    try:
        srv.wait_serving(120)
        yield srv
    finally:
        srv.stop()


def test_zstd_requests_are_answered_as_their_raw_twins(server: Server) -> None:
    for i, depth in enumerate((DEPTH, DEPTH_M)):
        rng = np.random.default_rng(100 + i)
        color = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        answers = []
        for c, d in ((raw(color), raw(depth)), (zstd(color), zstd(depth)), (raw(color), zstd(depth, level=3))):
            req = pb.DetectRequest(model="rgbd", request_id=f"z{i}", color=c, depth=d)
            resp = detect(server.target, req)
            problem = answer_problem(Case(req, color, depth, 16), resp)
            assert problem is None, problem
            answers.append([(x.score, x.box.x1, x.box.y2) for x in resp.instances])
        assert answers[0] == answers[1] == answers[2]
    with pytest.raises(grpc.RpcError) as err:  # and a bomb is refused through the server, which keeps serving
        detect(server.target, pb.DetectRequest(model="rgbd", color=raw(COLOR), depth=zstd(DEPTH, data=zstandard.
               ZstdCompressor().compress(bytes(64 << 20)))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ZSTD frame holds 67108864 bytes" in err.value.details()
    with DetectorClient(server.target) as client:  # local: raw, and the same answer as jpeg+zstd's depth
        assert client.encoding == "raw"
        a = client.detect(COLOR, DEPTH, model="rgbd")
    jpeg = cv2.imencode(".jpg", COLOR[:, :, ::-1])[1].tobytes()
    with DetectorClient(server.target, encoding="jpeg+zstd") as client:  # JPEG as it is, depth as ZSTD
        b = client.detect(jpeg, DEPTH, model="rgbd")
    with DetectorClient(server.target, encoding="as-is") as client:  # JPEG as it is, depth RAW
        c = client.detect(jpeg, DEPTH, model="rgbd")
    assert len(a.instances) == 16
    assert [(x.score, x.box) for x in b.instances] == [(x.score, x.box) for x in c.instances]


def test_async_client_encodes_as_the_sync_one(server: Server) -> None:
    import asyncio

    from dd.client import AsyncDetectorClient

    async def go(encoding: str):
        async with AsyncDetectorClient(server.target, encoding=encoding) as client:
            return client.encoding, await client.detect(COLOR, DEPTH, model="rgbd")

    with DetectorClient(server.target) as client:
        want = client.detect(COLOR, DEPTH, model="rgbd")
    encoding, got = asyncio.run(go("auto"))
    assert encoding == "raw"
    assert [(x.score, x.box) for x in got.instances] == [(x.score, x.box) for x in want.instances]
    encoding, got = asyncio.run(go("jpeg+zstd"))  # JPEG color: other pixels, same boxes
    assert encoding == "jpeg+zstd" and [x.box for x in got.instances] == [x.box for x in want.instances]
