"""scripts/fast_eager_check.py's matching and verdict: every mismatch, on either side, must lower the score.

Why: issue #18's claim (">= 99% of detections matched between the fast engine and eager fp32") is only as
good as the counting; the old bench_engine.compare ignored instances only the fast engine returned and
never applied the mask IoU bound.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from dd.worker.engines.base import Detections

_SPEC = importlib.util.spec_from_file_location(
    "fast_eager_check", Path(__file__).resolve().parents[3] / "scripts" / "fast_eager_check.py")
fec = importlib.util.module_from_spec(_SPEC)
sys.modules.setdefault("fast_eager_check", fec)  # dataclasses look their module up there
_SPEC.loader.exec_module(fec)

H, W = 60, 80


def dets(boxes: list[list[float]], scores: list[float], labels: list[int] | None = None,
         masks: list[list[float]] | None = None) -> Detections:
    """Detections whose masks fill their boxes (or the given mask boxes)."""
    m = np.zeros((len(boxes), H, W), bool)
    for k, (x1, y1, x2, y2) in enumerate(masks or boxes):
        m[k, int(y1):int(y2), int(x1):int(x2)] = True
    return Detections(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32),
                      np.asarray(labels or [1] * len(boxes), np.int64), m)


A, B, C = [0, 0, 20, 20], [30, 10, 60, 40], [5, 30, 25, 55]


def summary(pairs: list[tuple[Detections, Detections]]) -> dict:
    return fec.summarize([fec.match_image(r, c, H, W) for r, c in pairs])


def test_identical_answers_pass() -> None:
    d = dets([A, B, C], [0.9, 0.8, 0.7])
    s = summary([(d, d)])
    assert (s["matched"], s["total_instances"], s["verdict"]) == (3, 3, "PASS")
    assert s["box_iou"]["min"] == pytest.approx(1.0) and s["mask_iou"]["min"] == pytest.approx(1.0)
    assert s["max_score_diff"] == pytest.approx(0.0)


def test_instance_only_eager_has_lowers_the_share() -> None:
    s = summary([(dets([A, B, C], [0.9, 0.8, 0.7]), dets([A, B], [0.9, 0.8]))])
    assert (s["matched"], s["total_instances"], s["eager_unmatched"], s["fast_unmatched"]) == (2, 3, 1, 0)
    assert s["matched_frac"] == pytest.approx(2 / 3) and s["verdict"] == "FAIL"
    assert s["unmatched_scores"]["eager"] == [pytest.approx(0.7)]


def test_instance_only_fast_has_lowers_the_share() -> None:
    s = summary([(dets([A, B], [0.9, 0.8]), dets([A, B, C], [0.9, 0.8, 0.6]))])
    assert (s["matched"], s["total_instances"], s["eager_unmatched"], s["fast_unmatched"]) == (2, 3, 0, 1)
    assert s["verdict"] == "FAIL"


def test_fast_answers_on_an_image_where_eager_found_nothing() -> None:
    """The old compare returned "matched 0 of 0" here and the extra detection vanished."""
    good = dets([A, B], [0.9, 0.8])
    s = summary([(good, good), (dets([], []), dets([C], [0.9]))])
    assert (s["matched"], s["total_instances"], s["fast_unmatched"]) == (2, 3, 1)


def test_pair_below_the_box_iou_bound_is_unmatched_on_both_sides() -> None:
    shifted = [A[0] + 1, A[1], A[2] + 1, A[3]]  # IoU 19/21 = 0.905 < 0.98
    s = summary([(dets([A], [0.9]), dets([shifted], [0.9]))])
    assert (s["pairs"], s["matched"], s["total_instances"]) == (1, 0, 2)
    assert s["box_iou"]["min"] == pytest.approx(19 / 21, abs=1e-6)


def test_pair_below_the_mask_iou_bound_is_unmatched() -> None:
    half = [A[0], A[1], A[2], A[3] - 10]  # same box, mask IoU 0.5
    s = summary([(dets([A], [0.9]), dets([A], [0.9], masks=[half]))])
    assert (s["matched"], s["total_instances"]) == (0, 2)
    assert s["mask_iou"]["min"] == pytest.approx(0.5)


def test_other_class_never_pairs() -> None:
    s = summary([(dets([A], [0.9], [1]), dets([A], [0.9], [2]))])
    assert (s["pairs"], s["matched"], s["total_instances"]) == (0, 0, 2)


def test_share_counts_across_images_and_the_99_percent_bar() -> None:
    """100 matched and one extra fast instance: 100/101 = 99.0% passes; a second extra fails."""
    good = dets([A], [0.9])
    base = [(good, good)] * 100
    assert summary(base + [(dets([], []), good)])["verdict"] == "PASS"
    s = summary(base + [(dets([], []), good), (dets([], []), good)])
    assert s["matched_frac"] == pytest.approx(100 / 102) and s["verdict"] == "FAIL"


def test_nothing_to_compare_is_a_failure() -> None:
    s = summary([(dets([], []), dets([], []))])
    assert s["verdict"] == "FAIL" and "nothing" in s["reason"]


def test_rle_answers_match_full_mask_answers() -> None:
    """The fast engine returns RLE strings, eager full-image masks: the same masks must match exactly."""
    from dd.worker.engines.host_rle import rle_encode

    full = dets([A, B], [0.9, 0.8])
    rle = Detections(full.boxes, full.scores, full.labels, None, rle_encode(full.masks))
    s = summary([(full, rle)])
    assert s["matched"] == 2 and s["mask_iou"]["min"] == pytest.approx(1.0)


def test_markdown_states_threshold_and_verdict() -> None:
    s = summary([(dets([A], [0.9]), dets([A], [0.9]))])
    meta = {"model": "m", "architecture": "resnet50-FPN", "input_kind": "rgbd", "min_size": 512, "max_size": 1333,
            "device_name": "cpu", "torch": "x", "tf32": False, "width": W, "height": H, "first_seed": 10_000_000,
            "score_threshold": 0.5}
    md = fec.markdown(s, meta)
    assert "0.5 (the model's SCORE_THRESH_TEST" in md and "**PASS**" in md and "1 / 1 = 100.00%" in md


def _bench_engine():
    spec = importlib.util.spec_from_file_location(
        "bench_engine", Path(__file__).resolve().parents[3] / "scripts" / "bench_engine.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # its "from fast_eager_check import" finds the module registered above
    return mod


def test_bench_engine_compare_counts_what_only_the_fast_engine_returns() -> None:
    """bench_engine.py --check's per-image compare: a fast-only instance, and a fast answer on an image where
    eager found nothing, used to leave matched_frac at 1.0 and 'matched 0' unremarked."""
    compare = _bench_engine().compare
    c = compare(dets([A, B], [0.9, 0.8]), dets([A, B, C], [0.9, 0.8, 0.7]), H, W)
    assert (c["matched"], c["fast_only"], c["ref_only"]) == (2, 1, 0)
    assert c["matched_frac"] == pytest.approx(2 / 3)
    c = compare(dets([], []), dets([C], [0.9]), H, W)
    assert (c["matched"], c["fast_only"], c["matched_frac"]) == (0, 1, 0.0)


def test_bench_engine_compare_applies_the_mask_bound() -> None:
    half = [A[0], A[1], A[2], A[3] - 10]
    c = _bench_engine().compare(dets([A], [0.9]), dets([A], [0.9], masks=[half]), H, W)
    assert c["matched"] == 0 and c["min_mask_iou"] == pytest.approx(0.5)
