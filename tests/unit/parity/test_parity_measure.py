"""The parity measure itself (tests/parity.py): it passes identical answers and catches each kind of
difference its bounds are about, on detectron2's stored answers, so a parity test that passes means it."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from pycocotools import mask as mask_util

from tests import parity

FOLDER = parity.DETECTRON2_FIXTURES / "rgbd"


@pytest.fixture(scope="module")
def reference() -> tuple[list[parity.Dets], float]:
    expected = json.loads((FOLDER / "expected.json").read_text())
    return [parity.from_expected(e) for e in expected["images"]], float(expected["score_threshold"])


def _check(ref: list[parity.Dets], cand: list[parity.Dets], thr: float) -> list[str]:
    return parity.failures(parity.compare(ref, cand, thr))


def test_identical_answers_pass_exactly(reference: tuple[list[parity.Dets], float]) -> None:
    ref, thr = reference
    m = parity.compare(ref, copy.deepcopy(ref), thr)
    assert not parity.failures(m)
    assert m["matched"] == m["reference_detections"] > 0
    assert m["box_corner_dev_max_px"] == 0 and m["score_diff_max"] == 0 and m["mask_iou_min"] == 1.0


def test_order_of_detections_does_not_matter(reference: tuple[list[parity.Dets], float]) -> None:
    ref, thr = reference
    cand = []
    for d in ref:
        order = np.arange(len(d))[::-1]
        cand.append(parity.Dets(d.boxes[order], d.scores[order], d.labels[order],
                                [d.masks[i] for i in order] if d.masks is not None else None, d.height, d.width))
    assert not _check(ref, cand, thr)


def test_each_bound_catches_its_difference(reference: tuple[list[parity.Dets], float]) -> None:
    ref, thr = reference
    # boxes 1.5 px off: paired (IoU stays >= 0.9 for these sizes), but the corner bound fails
    cand = copy.deepcopy(ref)
    for d in cand:
        d.boxes = d.boxes + 1.5
    assert any("corner" in f for f in _check(ref, cand, thr))
    # scores 0.02 lower
    cand = copy.deepcopy(ref)
    for d in cand:
        d.scores = d.scores - 0.02
    assert any("score difference" in f for f in _check(ref, cand, thr))
    # one confident detection with another class: unmatched on both sides
    cand = copy.deepcopy(ref)
    i = int(np.argmax(cand[0].scores))
    cand[0].labels[i] = cand[0].labels[i] % 3 + 1
    bad = _check(ref, cand, thr)
    assert any("confident reference" in f for f in bad) and any("does not have" in f for f in bad)
    # an extra confident detection the reference does not have
    cand = copy.deepcopy(ref)
    d = cand[0]
    d.boxes = np.vstack([d.boxes, [[1, 1, 30, 30]]])
    d.scores = np.append(d.scores, 0.99)
    d.labels = np.append(d.labels, 1)
    assert d.masks is not None
    d.masks.append(mask_util.encode(np.asfortranarray(np.ones((d.height, d.width), np.uint8))))
    assert any("does not have" in f for f in _check(ref, cand, thr))
    # masks eroded to half their area
    cand = copy.deepcopy(ref)
    for d in cand:
        assert d.masks is not None
        halves = []
        for rle in d.masks:
            m = mask_util.decode(rle)
            ys = np.nonzero(m.any(axis=1))[0]
            if len(ys):
                m[: (ys[0] + ys[-1]) // 2] = 0
            halves.append(mask_util.encode(np.asfortranarray(m)))
        d.masks = halves
    assert any("mask IoU" in f for f in _check(ref, cand, thr))
    # missing masks
    cand = copy.deepcopy(ref)
    for d in cand:
        d.masks = None
    assert "masks missing on one side" in _check(ref, cand, thr)


def _drop_one_unconfident(dets: list[parity.Dets], thr: float) -> list[parity.Dets]:
    out = copy.deepcopy(dets)
    k = next(k for k, d in enumerate(out) if (d.scores < thr + 0.05).any())
    d = out[k]
    keep = np.arange(len(d)) != int(np.argmin(d.scores))
    out[k] = parity.Dets(d.boxes[keep], d.scores[keep], d.labels[keep],
                         [m for i, m in enumerate(d.masks or []) if keep[i]], d.height, d.width)
    return out


def test_an_unconfident_miss_is_tolerated_but_not_many(reference: tuple[list[parity.Dets], float]) -> None:
    """Below threshold + margin a detection may be lost (another implementation's rounding can push it
    under the threshold), but no more than 3% of the reference's detections."""
    ref, thr = reference
    many = ref * 20  # one miss in 20 x 23 detections: within the 3%
    assert not _check(many, _drop_one_unconfident(many, thr), thr)
    bad = _check(ref, _drop_one_unconfident(ref, thr), thr)  # one in 23: over 3%
    assert len(bad) == 1 and bad[0].startswith("matched"), bad


def test_engine_spec_takes_engine_options() -> None:
    assert parity.parse_spec("default") == ("default", "cpu", {})
    assert parity.parse_spec("fast:cuda") == ("fast", "cuda", {})
    assert parity.parse_spec('fast:cuda:{"fp16": false, "nms_iterations": 32}') == (
        "fast", "cuda", {"fp16": False, "nms_iterations": 32})
    for bad in ("fast:cuda:fp16=false", 'fast:cuda:["fp16"]'):
        with pytest.raises(ValueError, match="OPTIONS must be a JSON object"):
            parity.parse_spec(bad)


def test_command_compares_each_candidate_with_each_reference(tmp_path, capsys) -> None:
    """Several references and candidates in one run: each pair compared once (none with itself), engine
    options reach the engine (the fast engine runs on the CPU only when told allow_cpu; without it the
    folder's detectron2 engine stands in), and the JSON records say which pair each is."""
    out = tmp_path / "parity.json"
    # The fixture's four sizes each on its own padded size, as detectron2 runs them one at a time (without
    # exact_canvases they share the largest canvases, padded more: close, not detectron2's answers).
    fast_cpu = 'fast:cpu:{"allow_cpu": true, "exact_canvases": true}'
    rc = parity.main([str(FOLDER), "--reference", "expected", "--reference", "default:cpu",
                      "--candidate", "default:cpu", "--candidate", fast_cpu, "--json", str(out)])
    records = json.loads(out.read_text())
    assert rc == 0, capsys.readouterr().out
    pairs = [(r["candidate"], r["reference"]) for r in records]
    assert pairs == [("default:cpu", "expected"), (fast_cpu, "expected"), (fast_cpu, "default:cpu")]
    assert all(r["passes"] and r["metrics"]["matched"] == r["metrics"]["reference_detections"] > 0 for r in records)
    assert records[1]["timings"][fast_cpu]["engine"] == "fast"
    assert records[0]["timings"]["default:cpu"]["engine"] == "detectron2"
    assert records[0]["strict"]["match_iou"] == 0.98 and records[0]["strict"]["matched_fraction"] == 1.0
