"""The fast engine's CPU path against the torchvision reference: same weights, same answers.

On a GPU the same code runs in fp16 from CUDA graphs (scripts/bench_engine.py
--check compares it there); here it runs in fp32, so answers must match to
float rounding, and the vectorized mask paste + RLE must match torchvision's
paste_masks_in_image followed by pycocotools bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from dd.config import load_model_config
from dd.models.model_folder import random_model_folder
from dd.worker.engines.masks import rle_encode
from dd.worker.engines import load_engine
from dd.worker.engines.base import EngineInput
from dd.worker.engines.fast.engine import FastMaskRCNN, batch_buckets, resized_size
from dd.worker.engines.masks import paste_and_encode
from dd.worker.engines.torchvision_maskrcnn import TorchvisionMaskRCNN
from tests.conftest import scene


@pytest.mark.parametrize("height,width,count", [(240, 320, 40), (97, 131, 7), (60, 50, 1)])
def test_paste_and_rle_match_torchvision_and_pycocotools(height: int, width: int, count: int) -> None:
    g = torch.Generator().manual_seed(height)
    masks = torch.nn.functional.avg_pool2d(torch.rand(count, 1, 28, 28, generator=g), 5, 1, 2)[:, 0] * 1.4 - 0.2
    x0 = torch.rand(count, generator=g) * (width - 2)
    y0 = torch.rand(count, generator=g) * (height - 2)
    x1 = torch.minimum(x0 + torch.rand(count, generator=g) * 200 + 0.5, torch.tensor(float(width)))
    y1 = torch.minimum(y0 + torch.rand(count, generator=g) * 200 + 0.5, torch.tensor(float(height)))
    boxes = torch.stack([x0, y0, x1, y1], 1)
    boxes[0] = torch.tensor([0.0, 0.0, width, height])  # a box as large as the image
    if count > 2:
        masks[1] = -1.0  # an empty mask
        masks[2] = 2.0  # a full one: runs that wrap from one column into the next
    expected = rle_encode((paste_masks_in_image(masks[:, None], boxes, (height, width), padding=1)[:, 0] >= 0.5).numpy())
    assert paste_and_encode(masks, boxes, height, width) == expected


def test_paste_of_a_full_mask_on_an_image_sized_box_reaches_the_last_row() -> None:
    """The expanded box starts above the image, so the canvas needs more rows than the image has
    (a canvas clamped to the image's size cut the bottom rows off; this failed before)."""
    height, width = 240, 320
    masks = torch.full((2, 28, 28), 2.0)
    boxes = torch.tensor([[0.0, 0.0, width, height], [10.0, 5.0, 300.0, 230.0]])
    expected = rle_encode((paste_masks_in_image(masks[:, None], boxes, (height, width), padding=1)[:, 0] >= 0.5).numpy())
    assert paste_and_encode(masks, boxes, height, width) == expected


def _engines(folder: Path, **options: object) -> tuple[TorchvisionMaskRCNN, FastMaskRCNN]:
    cfg = load_model_config(folder)
    cfg = dataclasses.replace(cfg, engine_options={"allow_cpu": True, **options})
    ref, fast = TorchvisionMaskRCNN(cfg, "cpu"), FastMaskRCNN(cfg, "cpu")
    ref.load()
    fast.load()
    return ref, fast


def _assert_same(ref, fast) -> None:
    """Same instances (matched by class and box, since exactly tied scores may swap), same masks."""
    assert len(ref.scores) == len(fast.scores) > 0
    ref_rle = rle_encode(ref.masks)
    unmatched = set(range(len(ref.scores)))
    for i in range(len(fast.scores)):
        j = next((j for j in sorted(unmatched) if ref.labels[j] == fast.labels[i]
                  and np.allclose(ref.boxes[j], fast.boxes[i], atol=1e-3)), None)
        if j is None:
            # Random weights give exactly tied scores; greedy NMS (and the max-detections cut) may keep
            # either of two tied boxes. Accept a swap only between equal scores of one class.
            tie = [j for j in unmatched if ref.labels[j] == fast.labels[i] and abs(ref.scores[j] - fast.scores[i]) < 1e-7]
            assert tie or abs(fast.scores[i] - ref.scores.min()) < 1e-7, f"fast instance {i} has no reference twin"
            if tie:
                unmatched.discard(tie[0])
            continue
        unmatched.discard(j)
        assert abs(ref.scores[j] - fast.scores[i]) < 1e-5
        assert ref_rle[j] == fast.rle[i]


def _spread_scores(folder: Path) -> None:
    """Random weights score every box about the same, and exact ties make NMS order-dependent;
    a larger classifier weight spreads the scores so both engines face a well-posed problem."""
    path = folder / "model.pth"
    state = torch.load(path, weights_only=True)
    state["roi_heads.box_predictor.cls_score.weight"] *= 40
    state["rpn.head.cls_logits.weight"] *= 40
    torch.save(state, path)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fast")
    random_model_folder(root / "rgbd", input_kind="rgbd", seed=1, min_size=192, max_size=256, score_threshold=0.05)
    # Many classes and threshold 0: the case where class-wise NMS dominates.
    random_model_folder(root / "c30", input_kind="rgb", seed=3, categories=[f"c{i}" for i in range(30)],
                        min_size=160, max_size=224, score_threshold=0.0)
    for name in ("rgbd", "c30"):
        _spread_scores(root / name)
    return root


def test_fast_rgbd_batch_matches_reference(models: Path) -> None:
    ref, fast = _engines(models / "rgbd")
    items = [EngineInput(*scene(k), 0.05) for k in range(3)]
    items.append(EngineInput(*scene(9, h=200, w=300), 0.1))  # another size in the same batch
    for r, f in zip(ref.infer(items), fast.infer(items)):
        _assert_same(r, f)


@pytest.mark.parametrize("topk", [4096, 64])
def test_fast_many_classes_matches_reference(models: Path, topk: int) -> None:
    """With a small pre-NMS top-k the exactness check must notice and redo the image with every candidate."""
    ref, fast = _engines(models / "c30", pre_nms_topk=topk)
    items = [EngineInput(scene(k)[0], None, 0.0) for k in range(2)]
    for r, f in zip(ref.infer(items), fast.infer(items)):
        _assert_same(r, f)


def test_resized_size_matches_torchvision_transform(models: Path) -> None:
    ref, _ = _engines(models / "rgbd")
    for h, w in [(240, 320), (720, 1280), (479, 641), (100, 1000)]:
        images, _ = ref.model.transform([torch.zeros(4, h, w)])
        assert tuple(images.image_sizes[0]) == resized_size(h, w, 192, 256)


def test_fast_engine_falls_back_to_torchvision_without_gpu(models: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_model_config(models / "rgbd")
    cfg = dataclasses.replace(cfg, engine="fast")
    with caplog.at_level(logging.WARNING):
        engine = load_engine(cfg, "cpu")
    assert isinstance(engine, TorchvisionMaskRCNN)
    assert "falling back" in caplog.text and "GPU" in caplog.text


def test_served_fast_model_reports_the_engine_that_runs(models: Path, tmp_path: Path) -> None:
    """A "fast" model on a machine without a GPU is served by the torchvision fallback, and
    ListModels says so (it said "fast" before), while the answers stay the reference's."""
    import shutil

    from dd.client import DetectorClient
    from tests.serverproc import ServerProcess

    folder = tmp_path / "fastmodel"
    shutil.copytree(models / "rgbd", folder)
    cfg = json.loads((folder / "node_config.json").read_text())
    cfg["ENGINE"] = "fast"
    (folder / "node_config.json").write_text(json.dumps(cfg))
    srv = ServerProcess(folder).start()
    try:
        srv.wait_serving(120)
        with DetectorClient(srv.target) as client:
            (info,) = client.list_models()
            color, depth = scene(5)
            result = client.detect(color, depth)
    finally:
        srv.stop()
    assert info.engine == "torchvision" and info.ready
    assert result.instances
    assert "falling back to 'torchvision'" in srv.log()


@pytest.mark.parametrize("options", [{"fixed_shapes": False}, {"nms_iterations": 2}, {"batch_buckets": [1, 4]},
                                     {"class_mask_head": False}],
                         ids=["dynamic", "unsettled-nms-redone", "padded-bucket", "torchvision-mask-head"])
def test_fast_paths_match_reference(models: Path, options: dict, caplog: pytest.LogCaptureFixture) -> None:
    """The dynamic path, an NMS that does not settle in its iterations (those images are redone,
    and the log says how to avoid it), and a batch of 3 padded to a bucket of 4 all give
    torchvision's answers."""
    ref, fast = _engines(models / "rgbd", **options)
    items = [EngineInput(*scene(k), 0.05) for k in range(3)]
    with caplog.at_level(logging.WARNING):
        for r, f in zip(ref.infer(items), fast.infer(items)):
            _assert_same(r, f)
    if "nms_iterations" in options:
        assert fast.redone_images > 0 and "nms_iterations" in caplog.text
    if "batch_buckets" in options:
        # 240x320 resized to 192x256: its canvas, whatever the depth type (normalised before the network)
        assert fast.buckets == [1, 4] and (4, 192, 256) in fast._fixed_graphs
    # the mask head for each detection's class (mask_head.ClassMaskHead) unless asked otherwise
    assert (fast.heads.class_mask_head is None) == (options.get("class_mask_head") is False)


def test_batch_buckets() -> None:
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(1) == [1]
    assert batch_buckets(8, [3, 8, 16]) == [3, 8]


def test_paste_in_size_ordered_chunks_matches_torchvision() -> None:
    """Boxes of every size, chunked small: chunks go by size, answers come back in instance order."""
    from dd.worker.engines.masks import paste_transitions, rle_strings

    g = torch.Generator().manual_seed(5)
    n, height, width = 60, 150, 210
    masks = torch.rand(n, 28, 28, generator=g)
    x0, y0 = torch.rand(n, generator=g) * width, torch.rand(n, generator=g) * height
    size = 2 ** (torch.rand(n, generator=g) * 8)
    boxes = torch.stack([x0, y0, (x0 + size).clamp(max=width), (y0 + 0.7 * size).clamp(max=height)], 1)
    expected = rle_encode((paste_masks_in_image(masks[:, None], boxes, (height, width), padding=1)[:, 0] >= 0.5).numpy())
    inst, flat = paste_transitions(masks, boxes, height, width, max_elements=1 << 16)
    assert rle_strings(inst, flat, n, height, width) == expected


def test_fast_batch_with_an_image_that_keeps_nothing(models: Path) -> None:
    """Two images of one size, one with a threshold no score reaches: it gets no instances and an
    empty mask list, the other its usual answer (encoding zero instances raised, failing the batch)."""
    ref, fast = _engines(models / "rgbd")
    items = [EngineInput(*scene(0), 0.05), EngineInput(*scene(1), 1.01)]
    got = fast.infer(items)
    assert len(got[1].scores) == 0 and got[1].rle == []
    _assert_same(ref.infer(items[:1])[0], got[0])


def test_rle_strings_are_pycocotools_strings() -> None:
    """Long runs (several 5-bit groups), counts smaller than the one two before (negative deltas),
    masks that start on the first pixel or end on the last, an empty and a full one."""
    from pycocotools import mask as mask_util

    from dd.worker.engines.masks import rle_strings

    rng = np.random.default_rng(0)
    height, width = 1500, 2500
    masks = np.zeros((6, height, width), np.uint8)
    masks[1, :, :] = 1  # full
    masks[2, :700, :3] = 1  # from the first pixel
    masks[2, 900:, 2000:] = 1  # to the last
    for k in (3, 4, 5):
        for _ in range(40):  # rectangles of very different sizes
            y, x = rng.integers(0, height), rng.integers(0, width)
            hh, ww = rng.integers(1, 400), rng.integers(1, 800)
            masks[k, y:y + hh, x:x + ww] ^= 1
    flat = masks.transpose(0, 2, 1).reshape(len(masks), -1)  # COCO's column-major order
    edges = np.diff(np.pad(flat, ((0, 0), (1, 1))).astype(np.int8), axis=1) != 0
    inst, pos = np.nonzero(edges)
    order = rng.permutation(len(inst))  # the engine gives them in no particular order
    got = rle_strings(torch.from_numpy(inst[order]), torch.from_numpy(pos[order]), len(masks), height, width)
    expected = [r["counts"] for r in mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))]
    assert got == expected


@pytest.mark.parametrize("options", [{}, {"nms_iterations": 2}], ids=["one-graph", "unsettled-nms-redone"])
def test_a_started_batch_finishes_with_the_answers_of_infer(models: Path, options: dict) -> None:
    """Engine.start queues one size's batch and returns; the worker encodes the previous batch
    meanwhile (dd/worker/pipeline.py). Finishing gives infer's answers, redone images included; mixed
    sizes run as one graph on a canvas that holds them all; batches beyond the largest bucket run whole
    when finished."""
    ref, fast = _engines(models / "rgbd", batch_buckets=[1, 2, 4], **options)
    same = [EngineInput(*scene(k), 0.05) for k in range(3)]
    mixed = same[:2] + [EngineInput(*scene(9, h=200, w=300), 0.1)]
    too_many = [EngineInput(*scene(k % 3), 0.05) for k in range(5)]
    for batch in (same, mixed, too_many):
        assert (fast._batch_canvas(batch) is None) == (batch is too_many)
        expected = ref.infer(batch)
        finish = fast.start(batch)
        for r, f in zip(expected, finish()):
            _assert_same(r, f)
