"""dd.worker.encoders.kserve_v2: Detections -> ModelInferResponse bytes, read back with our generated
proto and with NVIDIA's tritonclient (its InferResult, in its own environment), and the core's
handling of KServe's requested outputs (no masks asked: none computed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_util

from dd.config import load_model_config
from dd.proto.deep_detection.v1 import detector_pb2 as dpb
from dd.proto.inference import grpc_service_pb2 as pb
from dd.worker.core import WorkerCore, WorkItem
from dd.worker.encoders import EncodeContext, Timings, encoder_for
from dd.worker.encoders.kserve_v2 import OUTPUTS, bytes_tensor, encode
from dd.worker.engines import load_engine
from dd.worker.engines.base import Detections, RleText
from tests import tritonclient_env

HERE = Path(__file__).resolve().parents[2]
H, W = 6, 7


def _detections() -> Detections:
    masks = np.zeros((2, H, W), dtype=bool)
    masks[0, 1:3, 2:5] = True
    masks[1, 4:6, 0:7] = True
    return Detections(np.array([[2, 1, 5, 3], [0.5, 4, 7, 6]], np.float32), np.array([0.875, 0.5], np.float32),
                      np.array([1, 3], np.int64), masks)


def _ctx(outputs: tuple[str, ...] = (), version: str = "") -> EncodeContext:
    return EncodeContext(("a", "b", "c"), "req-7", "maskrcnn", "maskrcnn.0", H, W, dpb.RLE, Timings(),
                         outputs=outputs, model_version=version)


def _tensors(resp: pb.ModelInferResponse) -> dict[str, tuple[str, list[int], bytes]]:
    return {o.name: (o.datatype, list(o.shape), raw) for o, raw in zip(resp.outputs, resp.raw_output_contents)}


def _split_bytes(raw: bytes) -> list[bytes]:
    items, i = [], 0
    while i < len(raw):
        n = int.from_bytes(raw[i:i + 4], "little")
        items.append(raw[i + 4:i + 4 + n])
        i += 4 + n
    return items


def test_it_is_the_encoder_of_kserve_v2() -> None:
    assert encoder_for("kserve_v2") is encode


def test_every_output_by_default_with_the_request_id_and_mask_size() -> None:
    det = _detections()
    resp = pb.ModelInferResponse.FromString(encode(det, _ctx()))
    assert (resp.id, resp.model_name, resp.model_version) == ("req-7", "maskrcnn", "1")
    assert resp.parameters["height"].int64_param == H and resp.parameters["width"].int64_param == W
    t = _tensors(resp)
    assert list(t) == list(OUTPUTS)
    assert t["boxes"][:2] == ("FP32", [2, 4]) and np.frombuffer(t["boxes"][2], "<f4").reshape(2, 4).tolist() == \
        det.boxes.tolist()
    assert t["scores"][:2] == ("FP32", [2]) and np.frombuffer(t["scores"][2], "<f4").tolist() == [0.875, 0.5]
    assert t["classes"][:2] == ("INT32", [2]) and np.frombuffer(t["classes"][2], "<i4").tolist() == [1, 3]
    assert t["masks"][:2] == ("BYTES", [2])
    counts = _split_bytes(t["masks"][2])
    decoded = mask_util.decode([{"size": [H, W], "counts": c} for c in counts])  # H x W x N
    assert np.array_equal(decoded.transpose(2, 0, 1).astype(bool), det.masks)


def test_only_the_requested_outputs_in_the_requested_order() -> None:
    resp = pb.ModelInferResponse.FromString(encode(_detections(), _ctx(("classes", "boxes"), version="3")))
    assert [o.name for o in resp.outputs] == ["classes", "boxes"] and len(resp.raw_output_contents) == 2
    assert resp.model_version == "3"


def test_no_instances_are_empty_tensors() -> None:
    empty = Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                       np.zeros((0, H, W), bool))
    t = _tensors(pb.ModelInferResponse.FromString(encode(empty, _ctx())))
    assert {n: (s, raw) for n, (_, s, raw) in t.items()} == {
        "boxes": ([0, 4], b""), "scores": ([0], b""), "classes": ([0], b""), "masks": ([0], b"")}


def test_an_engines_own_rle_is_used_as_it_is() -> None:
    det = _detections()
    det.masks, det.rle = None, [b"abc", b"de"]
    t = _tensors(pb.ModelInferResponse.FromString(encode(det, _ctx(("masks",)))))
    assert t["masks"][2] == bytes_tensor([b"abc", b"de"])


@pytest.mark.parametrize("strings", [[b"abc", b"", b"de" * 300], [], [b"x"]], ids=["three", "none", "one"])
def test_an_engines_rle_in_one_buffer_gives_the_same_tensor(strings: list[bytes]) -> None:
    """The fast engine's strings come in one buffer (RleText): the tensor is byte for byte a list's."""
    text = RleText(np.frombuffer(b"".join(strings) or b"\0", np.uint8)[:sum(map(len, strings))],
                   np.cumsum([0] + [len(x) for x in strings]).tolist())
    assert bytes_tensor(text) == bytes_tensor(strings)
    assert _split_bytes(bytes_tensor(text)) == strings
    n = len(strings)
    det = Detections(np.zeros((n, 4), np.float32), np.ones(n, np.float32), np.ones(n, np.int64), None, text)
    as_list = Detections(det.boxes, det.scores, det.labels, None, list(strings))
    assert encode(det, _ctx(("masks", "boxes"))) == encode(as_list, _ctx(("masks", "boxes")))


def test_masks_asked_for_but_not_computed_is_an_error_not_an_empty_answer() -> None:
    det = _detections()
    det.masks = None
    with pytest.raises(ValueError, match="masks were requested"):
        encode(det, _ctx(("boxes", "masks")))


def test_tritonclient_reads_what_the_encoder_writes(tmp_path: Path) -> None:
    det = _detections()
    files = []
    for i, outputs in enumerate([(), ("scores", "masks")]):
        files.append(tmp_path / f"r{i}.bin")
        files[-1].write_bytes(encode(det, _ctx(outputs)))
    got = json.loads(tritonclient_env.run(HERE / "tritonclient_decode.py", *map(str, files)).stdout)
    counts = _split_bytes(_tensors(pb.ModelInferResponse.FromString(files[0].read_bytes()))["masks"][2])
    full = got[0]
    assert (full["id"], full["model_name"], full["model_version"]) == ("req-7", "maskrcnn", "1")
    assert full["parameters"] == {"height": {"int64Param": str(H)}, "width": {"int64Param": str(W)}}
    assert full["tensors"] == {
        "boxes": {"dtype": "float32", "shape": [2, 4], "values": det.boxes.reshape(-1).tolist()},
        "scores": {"dtype": "float32", "shape": [2], "values": [0.875, 0.5]},
        "classes": {"dtype": "int32", "shape": [2], "values": [1, 3]},
        "masks": {"dtype": "object", "shape": [2], "values": [c.hex() for c in counts]}}
    assert got[1]["outputs"] == ["scores", "masks"] and list(got[1]["tensors"]) == ["scores", "masks"]


# ------------------------------------------------------------------ the core, KServe's requested outputs

class _Recording:
    """Wraps an engine and keeps the want_masks of each call."""

    def __init__(self, engine) -> None:
        self.engine, self.calls = engine, []

    def infer(self, batch, want_masks=True):
        self.calls.append(want_masks)
        return self.engine.infer(batch, want_masks)


def _core(tmp_path: Path) -> tuple[WorkerCore, _Recording]:
    (tmp_path / "categories.txt").write_text("a\nb\n")
    (tmp_path / "node_config.json").write_text(json.dumps({
        "DETECTION_TYPE": "RGBNullServicer", "CATEGORY_FILE": "categories.txt", "SCORE_THRESH_TEST": 0.0,
        "ENGINE_OPTIONS": {"instances": 3}}))
    cfg = load_model_config(tmp_path)
    engine = _Recording(load_engine(cfg, "cpu"))
    return WorkerCore(cfg, engine, "m.0"), engine  # type: ignore[arg-type]


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (16, 24, 3), dtype=np.uint8)


def test_the_core_computes_no_masks_when_no_kserve_request_asks_for_them(tmp_path: Path) -> None:
    core, engine = _core(tmp_path)
    items = [WorkItem(_image(i), None, request_id=f"k{i}", protocol="kserve_v2", outputs=("boxes", "scores"))
             for i in range(2)]
    outcomes = core.run(items)
    assert [o.code for o in outcomes] == ["OK", "OK"] and engine.calls == [False]
    resp = pb.ModelInferResponse.FromString(outcomes[1].body)
    assert resp.id == "k1" and [o.name for o in resp.outputs] == ["boxes", "scores"]


def test_the_core_computes_masks_when_one_request_of_the_batch_asks(tmp_path: Path) -> None:
    core, engine = _core(tmp_path)
    items = [WorkItem(_image(1), None, protocol="kserve_v2", outputs=("boxes",)),
             WorkItem(_image(2), None, protocol="kserve_v2", outputs=("masks",)),
             WorkItem(_image(3), None, protocol="kserve_v2")]
    outcomes = core.run(items)
    assert [o.code for o in outcomes] == ["OK"] * 3 and engine.calls == [True]
    every = pb.ModelInferResponse.FromString(outcomes[2].body)
    assert [o.name for o in every.outputs] == list(OUTPUTS) and every.model_version == "1"


def test_a_detector_request_beside_kserve_ones_keeps_its_masks(tmp_path: Path) -> None:
    core, engine = _core(tmp_path)
    outcomes = core.run([WorkItem(_image(1), None, protocol="kserve_v2", outputs=("scores",)),
                         WorkItem(_image(2), None)])
    assert engine.calls == [True]
    resp = dpb.DetectResponse.FromString(outcomes[1].body)
    assert resp.instances and all(i.mask.format == dpb.RLE and i.mask.counts for i in resp.instances)
