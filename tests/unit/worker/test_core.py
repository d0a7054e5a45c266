"""dd.worker.core: batch -> engine -> encoder, in-process (no sockets), with the null engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dd.config import load_model_config
from dd.proto.deep_detection.v1 import detector_pb2 as pb
from dd.worker import core as core_module
from dd.worker.core import WorkerCore, WorkItem
from dd.worker.engines import load_engine
from dd.worker.engines.null import null_detections


def _core(tmp_path: Path, **options: object) -> WorkerCore:
    (tmp_path / "categories.txt").write_text("a\nb\n")
    (tmp_path / "node_config.json").write_text(json.dumps({
        "DETECTION_TYPE": "RGBNullServicer", "CATEGORY_FILE": "categories.txt", "SCORE_THRESH_TEST": 0.0,
        "ENGINE_OPTIONS": {"instances": 3, **options}}))
    cfg = load_model_config(tmp_path)
    return WorkerCore(cfg, load_engine(cfg, "cpu"), "m.0")


def _image(value: int, h: int = 32, w: int = 48) -> np.ndarray:
    rng = np.random.default_rng(value)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    img[0, 0, 0] = value
    return img


def test_the_core_uses_the_public_rle_value() -> None:
    assert core_module.RLE == pb.RLE and core_module.NO_MASKS == pb.NONE


def test_a_batch_is_answered_in_order_with_its_timings(tmp_path: Path) -> None:
    core = _core(tmp_path)
    items = [WorkItem(_image(v), None, request_id=f"r{v}", dispatched_at=1.0, received_at=1.0, decode_us=7)
             for v in (10, 20, 30)]
    outcomes = core.run(items, started=2.0)
    assert [o.code for o in outcomes] == ["OK"] * 3
    for item, outcome in zip(items, outcomes):
        resp = pb.DetectResponse.FromString(outcome.body)
        want = null_detections(item.color, None, 3, 2, 0.0, True)
        assert resp.request_id == item.request_id and resp.worker == "m.0" and (resp.height, resp.width) == (32, 48)
        assert [i.class_id for i in resp.instances] == want.labels.tolist()
        assert all(i.mask.format == pb.RLE and i.mask.counts for i in resp.instances)
        assert resp.timing.batch_size == 3 and outcome.timings.batch_size == 3
        assert resp.timing.queued_us == outcome.timings.queue_us == 1_000_000
        assert resp.timing.decode_us == 7 and resp.timing.postprocess_us == outcome.timings.encode_us


def test_no_masks_when_none_are_asked_for(tmp_path: Path) -> None:
    outcome = _core(tmp_path).run([WorkItem(_image(1), None, mask_format=pb.NONE)])[0]
    resp = pb.DetectResponse.FromString(outcome.body)
    assert resp.instances and all(i.mask.format == pb.NONE and not i.mask.counts for i in resp.instances)


def test_an_image_the_engine_fails_on_costs_only_itself(tmp_path: Path) -> None:
    core = _core(tmp_path, fail_on_pixel=99)
    outcomes = core.run([WorkItem(_image(v), None) for v in (10, 99, 30)])
    assert [o.code for o in outcomes] == ["OK", "INTERNAL", "OK"]
    assert "fail_on_pixel" in outcomes[1].message


def test_a_response_that_cannot_be_encoded_costs_only_itself(tmp_path: Path) -> None:
    outcomes = _core(tmp_path).run([WorkItem(_image(1), None), WorkItem(_image(2), None, protocol="nope")])
    assert outcomes[0].code == "OK"
    assert outcomes[1].code == "INTERNAL" and "no response encoder for protocol 'nope'" in outcomes[1].message


def test_the_model_threshold_applies_when_the_request_has_none(tmp_path: Path) -> None:
    core = _core(tmp_path)
    low = pb.DetectResponse.FromString(core.run([WorkItem(_image(5), None)])[0].body)
    high = pb.DetectResponse.FromString(core.run([WorkItem(_image(5), None, score_threshold=0.99)])[0].body)
    assert all(i.score >= 0.99 for i in high.instances)
    assert len(high.instances) <= len(low.instances)


@pytest.mark.parametrize("protocol", ["", "detector_v1"])
def test_detector_v1_is_the_default_protocol(tmp_path: Path, protocol: str) -> None:
    assert _core(tmp_path).run([WorkItem(_image(3), None, protocol=protocol)])[0].code == "OK"
