"""detectron2's DefaultPredictor around the network: resize, normalise, pad; rescale, paste; the engine."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dd.config import load_model_config
from dd.models.detectron2.postprocess import paste_masks, rescale_boxes
from dd.models.detectron2.preprocess import (network_image, normalise_and_pad, resize_float, resize_uint8,
                                            resized_size, rgbd_image)
from dd.worker.engines import load_engine
from dd.worker.engines.base import EngineInput
from tests.conftest import scene
from tests.d2_folders import write_d2_folder

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("h, w, min_size, max_size, expected", [
    (480, 640, 416, 1333, (416, 555)),  # 554.67 rounds up (torchvision floors: 554)
    (480, 640, 800, 1333, (800, 1067)),  # 1066.67
    (720, 1280, 800, 1333, (750, 1333)),  # the longer side capped: 800 x 1422.2 -> scaled to 1333
    (500, 333, 400, 1000, (601, 400)),  # 600.6
    (240, 320, 240, 1333, (240, 320)),  # already the size
])
def test_resized_size_is_resize_shortest_edges(h: int, w: int, min_size: int, max_size: int, expected: tuple) -> None:
    assert resized_size(h, w, min_size, max_size) == expected


def test_uint8_images_resize_with_pils_bilinear_filter() -> None:
    color, _ = scene(3)
    out = resize_uint8(color, 100, 133)
    assert out.dtype == np.uint8 and out.shape == (100, 133, 3)
    assert np.array_equal(out, np.asarray(Image.fromarray(color).resize((133, 100), Image.BILINEAR)))
    img = network_image(color, None, 100, 1000)
    assert img.shape == (3, 100, 133) and torch.equal(img, torch.tensor(out.transpose(2, 0, 1)).float())


def test_rgbd_is_one_float_image_resized_bilinearly_with_depth_in_metres() -> None:
    color, depth = scene(4)
    depth[0, 0] = 0
    img = rgbd_image(color, depth, 0.001, None)
    assert img.dtype == np.float32 and img.shape == (*color.shape[:2], 4)
    assert np.array_equal(img[..., :3], color.astype(np.float32))
    assert img[0, 0, 3] == 0.0  # missing depth stays 0
    assert img[5, 5, 3] == np.float32(depth[5, 5]) * np.float32(0.001)
    assert rgbd_image(color, depth, 0.001, 1.5)[0, 0, 3] == np.float32(1.5)  # DEPTH_FILL
    assert rgbd_image(color, depth.astype(np.float32) * 0.001, 0.001, None)[5, 5, 3] == pytest.approx(img[5, 5, 3])
    assert np.allclose(rgbd_image(color, depth * 10, 0.0001, None), img)  # DEPTH_UNIT 0.1 mm
    out = network_image(color, depth, 100, 1000, depth_unit_m=0.001)
    ref = F.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None], (100, 133), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, ref[0], rtol=0, atol=1e-5)
    assert resize_float(img, *img.shape[:2]).shape == (4, *img.shape[:2])


def test_normalise_then_pad_with_zeros_to_32() -> None:
    a, b = torch.full((3, 40, 50), 10.0), torch.full((3, 65, 33), 20.0)
    x = normalise_and_pad([a, b], [10.0, 0.0, 5.0], [2.0, 1.0, 5.0])
    assert x.shape == (2, 3, 96, 64)
    assert torch.equal(x[0, :, :40, :50], torch.tensor([0.0, 10.0, 1.0]).view(3, 1, 1).expand(3, 40, 50))
    assert not x[0, :, 40:].any() and not x[0, :, :, 50:].any() and not x[1, :, :, 33:].any()


def test_boxes_scale_back_clip_and_empty_ones_go() -> None:
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0], [-5.0, 0.0, 300.0, 10.0], [100.0, 50.0, 120.0, 50.0]])
    out, keep = rescale_boxes(boxes, (100, 200), (200, 300))
    torch.testing.assert_close(out[0], torch.tensor([15.0, 40.0, 75.0, 80.0]))
    torch.testing.assert_close(out[1], torch.tensor([0.0, 0.0, 300.0, 20.0]))  # clipped to the 300 x 200 image
    assert keep.tolist() == [True, True, False]  # no height: dropped


def _paste_reference(prob: np.ndarray, box: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear sampling of the M x M map at each pixel centre (align_corners=False, zeros outside), by hand."""
    m = prob.shape[0]
    padded = np.zeros((m + 2, m + 2), np.float64)
    padded[1:-1, 1:-1] = prob
    x0, y0, x1, y1 = box.astype(np.float64)
    out = np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            u = ((x + 0.5 - x0) / (x1 - x0) * 2 - 1 + 1) * m / 2 - 0.5  # mask pixel coordinates
            v = ((y + 0.5 - y0) / (y1 - y0) * 2 - 1 + 1) * m / 2 - 0.5
            if not (-1 < u < m and -1 < v < m):
                continue
            i, j = math.floor(v), math.floor(u)
            fy, fx = v - i, u - j
            p = padded[i + 1:i + 3, j + 1:j + 3]
            val = (p[0, 0] * (1 - fy) * (1 - fx) + p[0, 1] * (1 - fy) * fx + p[1, 0] * fy * (1 - fx)
                   + p[1, 1] * fy * fx)
            out[y, x] = val >= 0.5
    return out


def test_masks_are_pasted_by_sampling_at_pixel_centres() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 28, 28, generator=g)
    probs[2] = 1.0
    boxes = torch.tensor([[5.3, 7.9, 40.2, 30.5], [0.0, 0.0, 63.0, 47.0], [10.0, 10.0, 20.0, 20.0]])
    masks = paste_masks(probs, boxes, 48, 64)
    assert masks.dtype == torch.bool and masks.shape == (3, 48, 64)
    for i in range(3):
        ref = _paste_reference(probs[i].numpy(), boxes[i].numpy(), 48, 64)
        assert (masks[i].numpy() != ref).sum() <= 2, i  # float32 against float64 at the 0.5 edge
    assert np.array_equal(np.argwhere(masks[2].numpy())[[0, -1]], [[10, 10], [19, 19]])  # pixels 10..19 exactly


# -- the engine --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("d2")
    return {kind: load_engine(load_model_config(write_d2_folder(root / kind, kind=kind)), "cpu")
            for kind in ("rgb", "rgbd")}


def test_a_detectron2_folder_runs_on_the_detectron2_engine(engines: dict) -> None:
    color, depth = scene(5)
    for kind, engine in engines.items():
        assert engine.name == "detectron2" and engine.model.semantics.name == "detectron2"
        det = engine.infer([EngineInput(color, depth if kind == "rgbd" else None, 0.05)])[0]
        assert len(det.scores) > 0, kind
        assert det.masks.shape == (len(det.scores), *color.shape[:2]) and det.masks.any()
        assert (det.boxes[:, 2:] > det.boxes[:, :2]).all() and (det.boxes >= 0).all()
        assert (det.boxes[:, 2] <= color.shape[1]).all() and (det.boxes[:, 3] <= color.shape[0]).all()
        assert set(det.labels) <= {1, 2} and (np.diff(det.scores) <= 0).all()


def test_scores_must_be_above_the_threshold_as_in_detectron2(engines: dict) -> None:
    engine = engines["rgb"]
    color, _ = scene(6)
    det = engine.infer([EngineInput(color, None, 0.05)])[0]
    cut = float(det.scores[len(det.scores) // 2])
    above = engine.infer([EngineInput(color, None, cut)])[0]
    assert len(above.scores) == int((det.scores > cut).sum())  # an instance scoring exactly the threshold is out
    np.testing.assert_array_equal(above.boxes, det.boxes[det.scores > cut])


def test_a_mixed_batch_answers_each_image_as_alone(engines: dict) -> None:
    engine = engines["rgbd"]
    (c1, d1), (c2, d2) = scene(7), scene(8, h=200, w=300)
    batch = [EngineInput(c1, d1, 0.3), EngineInput(c2, d2, 0.05), EngineInput(c1, d1.astype(np.float32) * 0.001, 0.3)]
    together = engine.infer(batch)
    for item, det in zip(batch, together):
        alone = engine.infer([item])[0]
        np.testing.assert_allclose(det.boxes, alone.boxes, atol=1e-3)
        np.testing.assert_array_equal(det.labels, alone.labels)
        assert (det.masks != alone.masks).mean() < 1e-4
    np.testing.assert_allclose(together[0].boxes, together[2].boxes, atol=1e-3)  # uint16 mm == float32 m


def test_depth_unit_is_threaded_to_the_torchvision_engine(tmp_path: Path) -> None:
    from dd.models.model_folder import random_model_folder

    color, depth = scene(9)
    dets = []
    for unit, d in ((None, depth), (0.0001, depth * 10)):
        folder = random_model_folder(tmp_path / str(unit), input_kind="rgbd", seed=3,
                                     extra={"DEPTH_UNIT": unit} if unit else None)
        engine = load_engine(load_model_config(folder), "cpu")
        dets.append(engine.infer([EngineInput(color, d, 0.3)])[0])
    assert len(dets[0].scores) > 0
    np.testing.assert_allclose(dets[0].boxes, dets[1].boxes, atol=1e-3)


# -- inspect -----------------------------------------------------------------------------------------

def _inspect(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dd", "inspect", str(path)], capture_output=True, text=True,
                          cwd=REPO, timeout=240)


def test_inspect_prints_what_was_understood(tmp_path: Path) -> None:
    folder = write_d2_folder(tmp_path / "m", kind="rgbd", node={"MIN_SIZE": 128, "SCORE_THRESH_TEST": 0.8},
                             categories=["carton", "bag"])
    run = _inspect(folder)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    for text in ("engine: detectron2", "model_final.pth: detectron2 format", "detectron2 trainer checkpoint",
                 "fit the YAML's network", "ResNet-50", "4 channels B, G, R, D", "mean [103.53, 116.28, 123.675, 2]",
                 "16-bit images x 0.001 m", "missing (0) stays 0", "shorter side to 128 (node_config.json)",
                 "longer at most 320 (YAML)", "score > 0.8 (node_config.json", "1 carton, 2 bag",
                 "detectron2's defaults used for:", "INPUT.FORMAT"):
        assert text in out, (text, out)


def test_inspect_fails_with_one_line_and_status_2(tmp_path: Path) -> None:
    folder = write_d2_folder(tmp_path / "m")
    text = (folder / "config.yaml").read_text()
    (folder / "config.yaml").write_text(text.replace("    DEPTH: 50", "    DEPTH: 50\n    DEFORM_ON_PER_STAGE: "
                                                                    "[false, true, true, true]"))
    run = _inspect(folder)
    assert run.returncode == 2 and run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "MODEL.RESNETS.DEFORM_ON_PER_STAGE" in lines[0] and "deformable" in lines[0]
    # Weights that do not fit the YAML are found by inspect too, not first by a worker.
    bad = write_d2_folder(tmp_path / "w")
    (bad / "config.yaml").write_text((bad / "config.yaml").read_text().replace("FC_DIM: 32", "FC_DIM: 16"))
    run = _inspect(bad)
    assert run.returncode == 2 and "roi_heads.box_head.fc1.weight" in run.stderr and "FC_DIM" in run.stderr
