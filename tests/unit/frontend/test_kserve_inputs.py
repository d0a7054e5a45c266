"""dd.frontend.protocols.kserve_inputs: a ModelInferRequest -> checked, protocol-free inputs (no server)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from dd.frontend.errors import ServeError, Status
from dd.frontend.protocols.kserve_inputs import parse_bytes_tensor, parse_infer
from dd.proto.inference import grpc_service_pb2 as pb

COLOR = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
DEPTH = (np.arange(4 * 5, dtype=np.uint16) * 1000).reshape(4, 5)


def _bytes(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


def _request(*tensors: tuple[str, str, list[int], bytes], **kw) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m", **kw)
    for name, datatype, shape, raw in tensors:
        req.inputs.add(name=name, datatype=datatype, shape=shape)
        req.raw_input_contents.append(raw)
    return req


def _refused(req: pb.ModelInferRequest, kind: str = "rgbd", status: Status = Status.INVALID_ARGUMENT) -> str:
    with pytest.raises(ServeError) as err:
        parse_infer(req, kind)
    assert err.value.status == status
    return err.value.message


def test_raw_color_and_depth() -> None:
    req = _request(("color", "UINT8", [4, 5, 3], COLOR.tobytes()), ("depth", "UINT16", [4, 5], DEPTH.tobytes()),
                   id="r1")
    req.parameters["score_threshold"].double_param = 0.25
    req.outputs.add(name="scores")
    req.outputs.add(name="boxes")
    got = parse_infer(req, "rgbd")
    assert (got.model, got.version, got.request_id, got.score_threshold) == ("m", "1", "r1", 0.25)
    assert got.outputs == ("scores", "boxes") and not got.wants_masks
    assert (got.color.encoding, got.color.shape, got.color.dtype) == ("raw", (4, 5, 3), "uint8")
    assert bytes(got.color.data) == COLOR.tobytes()
    assert (got.depth.shape, got.depth.dtype, bytes(got.depth.data)) == ((4, 5), "uint16", DEPTH.tobytes())


def test_encoded_inputs_and_a_batch_of_one() -> None:
    req = _request(("color", "BYTES", [1], _bytes(b"\xff\xd8\xffjpeg")),
                   ("depth", "FP32", [1, 4, 5], np.ones((4, 5), "<f4").tobytes()))
    got = parse_infer(req, "rgbd")
    assert (got.color.encoding, bytes(got.color.data)) == ("encoded", b"\xff\xd8\xffjpeg")
    assert (got.depth.shape, got.depth.dtype) == ((4, 5), "float32") and got.wants_masks and got.outputs == ()
    got = parse_infer(_request(("color", "UINT8", [1, 4, 5, 3], COLOR.tobytes())), "rgb")
    assert got.color.shape == (4, 5, 3) and got.depth is None


def test_typed_contents() -> None:
    req = pb.ModelInferRequest(model_name="m")
    color = req.inputs.add(name="color", datatype="UINT8", shape=[4, 5, 3])
    color.contents.uint_contents.extend(COLOR.reshape(-1).tolist())
    depth = req.inputs.add(name="depth", datatype="BYTES", shape=[1])
    depth.contents.bytes_contents.append(b"\x89PNG")
    got = parse_infer(req, "rgbd")
    assert bytes(got.color.data) == COLOR.tobytes() and got.color.dtype == "uint8"
    assert (got.depth.encoding, bytes(got.depth.data)) == ("encoded", b"\x89PNG")
    color.contents.uint_contents[0] = 300
    assert "UINT8 values must lie in [0, 255]" in _refused(req)


@pytest.mark.parametrize("tensors, kind, expected", [
    ([("color", "FP32", [4, 5, 3], b"")], "rgb",
     "input 'color': datatype 'FP32' is not accepted; send UINT8 [H, W, 3] (RGB pixels) or BYTES [1]"),
    ([("color", "UINT8", [4, 5, 4], b"")], "rgb", "input 'color': shape [4, 5, 4] is not accepted"),
    ([("color", "UINT8", [4, 5, 3], b"abc")], "rgb", "input 'color': 3 bytes of raw data, but shape [4, 5, 3]"),
    ([("color", "BYTES", [2], _bytes(b"a", b"b"))], "rgb", "a BYTES input holds one encoded image, shape [1]"),
    ([("color", "BYTES", [1], _bytes(b"a", b"b"))], "rgb", "holds one encoded image; got 2 elements"),
    ([("color", "BYTES", [1], b"\x09\x00\x00\x00abc")], "rgb", "announces 9 bytes but only 3 follow"),
    ([("color", "UINT8", [4, 5, 3], COLOR.tobytes())], "rgbd", "is RGB-D and needs input 'depth'; send UINT16"),
    ([("depth", "UINT16", [4, 5], DEPTH.tobytes())], "rgbd", "input 'color' is missing"),
    ([("color", "UINT8", [4, 5, 3], COLOR.tobytes()), ("depth", "UINT16", [4, 5], DEPTH.tobytes())], "rgb",
     "unknown input 'depth' (an RGB model takes no depth)"),
    ([("colour", "UINT8", [4, 5, 3], COLOR.tobytes())], "rgb", "unknown input 'colour'; model 'm' takes color"),
    ([("color", "UINT8", [4, 5, 3], COLOR.tobytes()), ("color", "UINT8", [4, 5, 3], COLOR.tobytes())], "rgb",
     "input 'color' is given twice"),
    ([("color", "UINT8", [4, 5, 3], COLOR.tobytes()), ("depth", "INT32", [4, 5], DEPTH.tobytes())], "rgbd",
     "input 'depth': datatype 'INT32' is not accepted; send UINT16 [H, W] (millimetres) or FP32 [H, W] (metres)"),
])
def test_bad_inputs_name_the_input_and_what_is_allowed(tensors, kind, expected) -> None:
    assert expected in _refused(_request(*tensors), kind)


def test_raw_contents_for_some_inputs_only() -> None:
    req = _request(("color", "UINT8", [4, 5, 3], COLOR.tobytes()))
    req.inputs.add(name="depth", datatype="UINT16", shape=[4, 5])
    assert "1 raw_input_contents for 2 inputs" in _refused(req)


def test_outputs_and_parameters() -> None:
    req = _request(("color", "UINT8", [4, 5, 3], COLOR.tobytes()))
    req.outputs.add(name="labels")
    assert "unknown output 'labels'; the outputs are boxes, scores, classes, masks" in _refused(req, "rgb")
    del req.outputs[:]
    req.outputs.add(name="boxes")
    req.outputs.add(name="boxes")
    assert "output 'boxes' is requested twice" in _refused(req, "rgb")
    del req.outputs[:]
    req.parameters["score_threshold"].double_param = 1.5
    assert "score_threshold must be in [0, 1]" in _refused(req, "rgb")
    req.parameters["score_threshold"].string_param = "high"
    assert "must be a number" in _refused(req, "rgb")
    req.parameters["score_threshold"].int64_param = 1
    assert parse_infer(req, "rgb").score_threshold == 1.0
    req.parameters["priority"].int64_param = 3  # ignored, as Triton ignores what it does not use
    assert parse_infer(req, "rgb").score_threshold == 1.0


def test_shared_memory_is_refused_while_it_is_off() -> None:
    req = _request(("color", "UINT8", [4, 5, 3], COLOR.tobytes()))
    req.inputs[0].parameters["shared_memory_region"].string_param = "r0"
    assert "--allow-client-shm" in _refused(req, "rgb")
    req = _request(("color", "UINT8", [4, 5, 3], COLOR.tobytes()))
    req.outputs.add(name="boxes").parameters["shared_memory_region"].string_param = "r0"
    assert "output 'boxes' names a shared-memory region" in _refused(req, "rgb")


def test_versions() -> None:
    ok = _request(("color", "UINT8", [4, 5, 3], COLOR.tobytes()), model_version="1")
    assert parse_infer(ok, "rgb").version == "1"
    bad = _request(("color", "UINT8", [4, 5, 3], COLOR.tobytes()), model_version="2")
    assert "has no version '2'" in _refused(bad, "rgb", Status.NOT_FOUND)


def test_bytes_tensor_parsing() -> None:
    assert [bytes(b) for b in parse_bytes_tensor(_bytes(b"ab", b"", b"c"), "x")] == [b"ab", b"", b"c"]
    with pytest.raises(ServeError, match="left over"):
        parse_bytes_tensor(b"\x01\x00", "x")


class _Registry:
    """A client shared-memory registry over one buffer (the real one is tested in test_client_shm.py)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.seen: list[tuple[str, int, int]] = []

    def _check(self, name: str, offset: int, byte_size: int) -> None:
        if name != "r0" or offset + byte_size > len(self.data):
            raise ServeError(Status.INVALID_ARGUMENT, "outside")

    def view(self, name: str, offset: int, byte_size: int) -> memoryview:
        self._check(name, offset, byte_size)
        self.seen.append((name, offset, byte_size))
        return memoryview(self.data)[offset:offset + byte_size]

    def region(self, name: str, offset: int, byte_size: int):
        self._check(name, offset, byte_size)

        class R:
            key, offset = "/k", 100
        return R()


def _in_shm(tensor, offset: int, size: int, region: str = "r0") -> None:
    tensor.parameters["shared_memory_region"].string_param = region
    tensor.parameters["shared_memory_byte_size"].int64_param = size
    if offset:
        tensor.parameters["shared_memory_offset"].int64_param = offset


def test_inputs_in_shared_memory_are_views_of_the_region_and_raw_contents_count_the_others() -> None:
    registry = _Registry(COLOR.tobytes() + DEPTH.tobytes())
    req = pb.ModelInferRequest(model_name="m")
    _in_shm(req.inputs.add(name="color", datatype="UINT8", shape=[4, 5, 3]), 0, COLOR.nbytes)
    req.inputs.add(name="depth", datatype="UINT16", shape=[4, 5])
    req.raw_input_contents.append(DEPTH.tobytes())  # one raw content: for depth, the one input in the message
    got = parse_infer(req, "rgbd", shm=registry)
    assert isinstance(got.color.data, memoryview) and bytes(got.color.data) == COLOR.tobytes()
    assert bytes(got.depth.data) == DEPTH.tobytes()
    _in_shm(req.inputs[1], COLOR.nbytes, DEPTH.nbytes)
    assert "0 inputs not in shared memory" in _refused_with(req, registry)
    del req.raw_input_contents[:]
    got = parse_infer(req, "rgbd", shm=registry)
    assert bytes(got.depth.data) == DEPTH.tobytes() and registry.seen[-1] == ("r0", COLOR.nbytes, DEPTH.nbytes)


def _refused_with(req: pb.ModelInferRequest, registry, kind: str = "rgbd") -> str:
    with pytest.raises(ServeError) as err:
        parse_infer(req, kind, shm=registry)
    assert err.value.status == Status.INVALID_ARGUMENT
    return err.value.message


def test_shared_memory_parameters_are_checked() -> None:
    registry = _Registry(COLOR.tobytes())
    req = pb.ModelInferRequest(model_name="m")
    color = req.inputs.add(name="color", datatype="UINT8", shape=[4, 5, 3])
    _in_shm(color, 0, COLOR.nbytes - 1)
    assert "59 bytes of raw data, but shape [4, 5, 3] of UINT8 needs 60" in _refused_with(req, registry, "rgb")
    _in_shm(color, 1, COLOR.nbytes)
    assert "outside" in _refused_with(req, registry, "rgb")
    color.parameters["shared_memory_offset"].int64_param = -1
    assert "shared_memory_offset must be >= 0" in _refused_with(req, registry, "rgb")
    color.parameters["shared_memory_offset"].string_param = "0"
    assert "shared_memory_offset must be an integer" in _refused_with(req, registry, "rgb")
    del color.parameters["shared_memory_offset"]
    del color.parameters["shared_memory_byte_size"]
    assert "needs both shared_memory_region" in _refused_with(req, registry, "rgb")
    color.parameters["shared_memory_byte_size"].int64_param = COLOR.nbytes
    color.parameters["shared_memory_region"].int64_param = 3
    assert "must be the name of a registered region" in _refused_with(req, registry, "rgb")


def test_outputs_in_shared_memory_become_absolute_ranges_of_the_segment() -> None:
    registry = _Registry(b"\0" * 1000)
    req = _request(("color", "UINT8", [4, 5, 3], COLOR.tobytes()))
    req.outputs.add(name="scores")
    _in_shm(req.outputs.add(name="boxes"), 40, 200)
    got = parse_infer(req, "rgb", shm=registry)
    assert got.outputs == ("scores", "boxes")
    assert [(r.output, r.shm_key, r.offset, r.byte_size) for r in got.output_regions] == [("boxes", "/k", 140, 200)]
    _in_shm(req.outputs[1], 900, 200)
    assert "outside" in _refused_with(req, registry, "rgb")
