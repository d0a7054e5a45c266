"""Outputs written into client shared memory by the worker (dd/worker/output_regions.py) and the
KServe encoder's response for them (raw contents empty, the bytes written as a parameter)."""

from __future__ import annotations

import json
import os
from multiprocessing import shared_memory
from typing import Iterator

import numpy as np
import pytest

from dd.config import load_model_config
from dd.ipc import client_segments
from dd.proto.deep_detection.ipc.v1 import ipc_pb2
from dd.proto.deep_detection.v1 import detector_pb2 as dpb
from dd.proto.inference import grpc_service_pb2 as pb
from dd.worker.core import WorkerCore, WorkItem
from dd.worker.encoders import EncodeContext, RequestError, Timings
from dd.worker.encoders.kserve_v2 import encode
from dd.worker.engines.base import Detections
from dd.worker.output_regions import OutputRange, OutputRegions


@pytest.fixture()
def segment() -> Iterator[shared_memory.SharedMemory]:
    shm = shared_memory.SharedMemory(create=True, size=1024)
    shm.buf[:1024] = b"\xee" * 1024
    yield shm
    shm.close()
    try:
        shm.unlink()
    except FileNotFoundError:
        pass


def _det() -> Detections:
    return Detections(np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32), np.array([0.9, 0.5], np.float32),
                      np.array([1, 2], np.int64), None)


def _ctx(sink, outputs=("boxes", "scores")) -> EncodeContext:
    return EncodeContext(("a", "b"), "r", "m", "m.0", 10, 10, dpb.NONE, Timings(), outputs=outputs, output_sink=sink)


def test_an_output_goes_into_its_range_and_not_into_the_response(segment) -> None:
    sink = OutputRegions([OutputRange("boxes", "/" + segment.name, 100, 64)])
    resp = pb.ModelInferResponse.FromString(encode(_det(), _ctx(sink)))
    boxes, scores = resp.outputs
    assert (boxes.name, list(boxes.shape), boxes.datatype) == ("boxes", [2, 4], "FP32")
    assert boxes.parameters["shared_memory_byte_size"].int64_param == 32
    assert resp.raw_output_contents[0] == b""
    assert np.frombuffer(bytes(segment.buf[100:132]), "<f4").tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert bytes(segment.buf[96:100]) == b"\xee" * 4 and bytes(segment.buf[132:164]) == b"\xee" * 32  # nothing else
    assert np.frombuffer(resp.raw_output_contents[1], "<f4").tolist() == pytest.approx([0.9, 0.5])
    assert "shared_memory_byte_size" not in scores.parameters


def test_an_output_larger_than_its_range_fails_the_request_and_writes_nothing(segment) -> None:
    sink = OutputRegions([OutputRange("boxes", "/" + segment.name, 0, 31)])
    with pytest.raises(RequestError) as err:
        encode(_det(), _ctx(sink))
    assert err.value.code == "INVALID_ARGUMENT" and "32 bytes" in err.value.message and "holds 31" in err.value.message
    assert bytes(segment.buf[:32]) == b"\xee" * 32


def test_a_segment_shrunk_or_gone_or_of_another_user_is_refused_at_write(segment) -> None:
    key = "/" + segment.name
    os.truncate(client_segments.SHM_DIR / segment.name, 64)
    with pytest.raises(RequestError) as err:
        OutputRegions([OutputRange("boxes", key, 100, 64)]).write("boxes", b"x" * 8)
    assert err.value.code == "INVALID_ARGUMENT" and "holds 64 bytes" in err.value.message
    assert os.stat(client_segments.SHM_DIR / segment.name).st_size == 64  # not grown by the write
    with pytest.raises(RequestError) as err:
        OutputRegions([OutputRange("boxes", key, 0, 8)], uid=os.geteuid() + 1).write("boxes", b"x" * 8)
    assert err.value.code == "PERMISSION_DENIED"
    with pytest.raises(RequestError) as err:
        OutputRegions([OutputRange("boxes", "/dd-test-gone", 0, 8)]).write("boxes", b"x")
    assert "does not exist" in err.value.message


def test_from_the_ipc_request(segment) -> None:
    req = ipc_pb2.InferRequest(output_regions=[ipc_pb2.OutputRegion(output="scores", shm_key="/" + segment.name,
                                                                     offset=8, byte_size=8)])
    sink = OutputRegions.from_request(req.output_regions)
    assert "scores" in sink and "boxes" not in sink
    assert OutputRegions.from_request(ipc_pb2.InferRequest().output_regions) is None


class _Engine:
    def infer(self, inputs, want_masks):
        return [_det() for _ in inputs]


def test_the_core_fails_only_the_request_whose_region_is_too_small(segment, tmp_path) -> None:
    (tmp_path / "categories.txt").write_text("a\nb\n")
    (tmp_path / "node_config.json").write_text(json.dumps({
        "DETECTION_TYPE": "RGBNullServicer", "CATEGORY_FILE": "categories.txt", "SCORE_THRESH_TEST": 0.0}))
    core = WorkerCore(load_model_config(tmp_path), _Engine(), "m.0")  # type: ignore[arg-type]
    color = np.zeros((10, 10, 3), np.uint8)
    small = OutputRegions([OutputRange("boxes", "/" + segment.name, 0, 4)])
    fits = OutputRegions([OutputRange("boxes", "/" + segment.name, 512, 32)])
    out = core.run([WorkItem(color, None, protocol="kserve_v2", outputs=("boxes",), output_sink=small),
                    WorkItem(color, None, protocol="kserve_v2", outputs=("boxes",), output_sink=fits)])
    assert out[0].code == "INVALID_ARGUMENT" and "holds 4" in out[0].message
    assert out[1].code == "OK"
    assert np.frombuffer(bytes(segment.buf[512:544]), "<f4").tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
