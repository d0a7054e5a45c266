"""Tests for the synthetic scene generator.

The annotations are only worth anything if they agree exactly with the pixels and the
scenes keep the property that makes them useful (same-looking neighbours separated only
by depth), so that is what is checked here, plus the speed the data loader relies on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_util

from dd.synth.__main__ import main
from dd.synth.scenes import CATEGORIES, MIN_AREA, MIN_CORE, SEED_STRIDE, Scene, generate_scene, write_dataset

SEEDS = range(8)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2


@pytest.fixture(scope="module")
def scenes() -> dict[int, Scene]:
    return {s: generate_scene(s) for s in SEEDS}


def _assert_same(a: Scene, b: Scene) -> None:
    for name in ("color", "depth", "masks", "boxes", "labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_deterministic(scenes: dict[int, Scene]) -> None:
    _assert_same(generate_scene(3), scenes[3])
    other = scenes[4]
    assert not np.array_equal(scenes[3].color, other.color)
    assert not np.array_equal(scenes[3].depth, other.depth)


def test_shapes_and_dtypes(scenes: dict[int, Scene]) -> None:
    assert CATEGORIES == ["carton"]
    for sc in list(scenes.values()) + [generate_scene(11, width=320, height=240)]:
        h, w = sc.depth.shape
        n = len(sc.masks)
        assert sc.color.shape == (h, w, 3) and sc.color.dtype == np.uint8
        assert sc.depth.dtype == np.uint16
        assert sc.masks.shape == (n, h, w) and sc.masks.dtype == np.bool_
        assert sc.boxes.shape == (n, 4) and sc.boxes.dtype == np.float32
        assert sc.labels.shape == (n,) and sc.labels.dtype == np.int64
        assert n >= 1 and (sc.labels == 1).all()
    assert generate_scene(11, width=320, height=240).depth.shape == (240, 320)


def test_masks_disjoint_with_tight_boxes(scenes: dict[int, Scene]) -> None:
    for sc in scenes.values():
        assert sc.masks.sum(0).max() <= 1
        for m, box in zip(sc.masks, sc.boxes):
            assert m.sum() >= MIN_AREA
            assert cv2.erode(m.astype(np.uint8), np.ones((5, 5), np.uint8)).sum() >= MIN_CORE
            ys, xs = np.nonzero(m)
            np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


def test_depth_has_missing_pixels_and_plausible_range(scenes: dict[int, Scene]) -> None:
    for sc in scenes.values():
        valid = sc.depth[sc.depth > 0]
        assert 0.005 < (sc.depth == 0).mean() < 0.3
        assert 1000 < np.median(valid) < 3500
        assert valid.max() < 3600


def test_cartons_are_above_the_pallet(scenes: dict[int, Scene]) -> None:
    for sc in scenes.values():
        # The floor is the farthest surface; the pallet deck is 144 mm above it and every
        # carton top at least another ~130 mm (shortest carton minus height jitter).
        floor = np.percentile(sc.depth[sc.depth > 0], 99.9)
        for m in sc.masks:
            d = sc.depth[m]
            d = d[d > 0]
            assert len(d) > 0.5 * m.sum()
            assert np.median(d) < floor - 200


def test_touching_same_colour_neighbours_differ_in_depth(scenes: dict[int, Scene]) -> None:
    kernel = np.ones((5, 5), np.uint8)
    found = 0
    for sc in scenes.values():
        med_rgb = [np.median(sc.color[m], axis=0) for m in sc.masks]
        med_d = [np.median(sc.depth[m & (sc.depth > 0)]) for m in sc.masks]
        grown = [cv2.dilate(m.astype(np.uint8), kernel).astype(bool) for m in sc.masks]
        for i in range(len(sc.masks)):
            for j in range(i + 1, len(sc.masks)):
                touching = (grown[i] & sc.masks[j]).sum() >= 10
                same_colour = np.abs(med_rgb[i] - med_rgb[j]).max() <= 12
                if touching and same_colour and abs(med_d[i] - med_d[j]) >= 3:
                    found += 1
    assert found >= 3


def test_dataset_annotations_match_pixels(tmp_path: Path) -> None:
    seed = 7
    path = write_dataset(tmp_path / "ds", count=3, seed=seed)
    coco = json.loads(path.read_text())
    assert coco["categories"] == [{"id": 1, "name": "carton"}]
    assert [im["file_name"] for im in coco["images"]] == [f"color/scene_{i:06d}.jpg" for i in range(3)]
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    for i, im in enumerate(coco["images"]):
        sc = generate_scene(seed * SEED_STRIDE + i)
        assert (im["width"], im["height"]) == (640, 480)
        color = cv2.imread(str(tmp_path / "ds" / im["file_name"]), cv2.IMREAD_COLOR)
        assert color.shape == (480, 640, 3)
        # JPEG is lossy, but the channel order must be right: compare to RGB→BGR.
        diff = np.abs(color.astype(np.int16) - sc.color[..., ::-1].astype(np.int16)).mean()
        assert diff < 4
        depth = cv2.imread(str(tmp_path / "ds" / "depth" / f"scene_{i:06d}.png"), cv2.IMREAD_UNCHANGED)
        assert depth.dtype == np.uint16
        np.testing.assert_array_equal(depth, sc.depth)
        anns = by_image[im["id"]]
        assert len(anns) == len(sc.masks)
        for ann, m, box in zip(anns, sc.masks, sc.boxes):
            assert ann["category_id"] == 1 and ann["iscrowd"] == 0
            assert isinstance(ann["segmentation"]["counts"], str)
            rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode("ascii"))
            decoded = mask_util.decode(rle).astype(bool)
            np.testing.assert_array_equal(decoded, m)
            assert ann["area"] == int(m.sum())
            x1, y1, x2, y2 = box.tolist()
            assert ann["bbox"] == [x1, y1, x2 - x1, y2 - y1]
            np.testing.assert_allclose(mask_util.toBbox(rle), ann["bbox"])


def test_dataset_seeds_do_not_overlap() -> None:
    assert not np.array_equal(generate_scene(0 * SEED_STRIDE + 1).depth, generate_scene(1 * SEED_STRIDE + 1).depth)
    with pytest.raises(ValueError):
        write_dataset(Path("/nonexistent"), count=SEED_STRIDE + 1, seed=0)


def test_cli_writes_dataset(tmp_path: Path) -> None:
    assert main([str(tmp_path / "cli"), "--count", "1", "--seed", "2", "--width", "320", "--height", "240"]) == 0
    coco = json.loads((tmp_path / "cli" / "annotations.json").read_text())
    assert coco["images"][0]["width"] == 320 and len(coco["annotations"]) >= 1
    assert (tmp_path / "cli" / "depth" / "scene_000000.png").exists()


def test_rendering_is_fast() -> None:
    """Under 100 ms of one core's work per 640x480 scene. Measured as this process's CPU time, with
    OpenCV on one thread: wall time on a shared machine also counts whoever else had the core."""
    import cv2

    generate_scene(100)  # warm caches (grids, noise bank)
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        start = time.process_time()
        n = 10
        for s in range(n):
            generate_scene(1000 + s)
        per_scene = (time.process_time() - start) / n
    finally:
        cv2.setNumThreads(threads)
    assert per_scene < 0.1, f"{per_scene * 1000:.1f} ms CPU time per scene"
