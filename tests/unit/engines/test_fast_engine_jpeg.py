"""The fast engine given JPEGs still compressed (EncodedImage): the same answers as given the frontend's
pixels, on every path (graph, op by op, images redone); on a GPU, nvJPEG's few levels of difference
keep detections within the parity bounds (tests/parity.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from dd.config import load_model_config
from dd.models.model_folder import random_model_folder
from dd.worker.engines.base import EncodedImage, EngineInput
from dd.worker.engines.fast.engine import FastMaskRCNN
from dd.worker.engines.jpeg_decode import decode_cpu
from tests import parity
from tests.conftest import scene
from tests.jpeg_samples import jpeg

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "configs" / "models" / "demo-rgbd"


def _inputs(colors: list[np.ndarray], depths: list[np.ndarray], thr: float) -> tuple[list, list]:
    """The same images as the frontend's pixels, and as compressed JPEGs."""
    datas = [jpeg(c, quality=85) for c in colors]
    encoded = [EncodedImage(np.frombuffer(d, np.uint8), *c.shape[:2]) for d, c in zip(datas, colors)]
    pixels = [EngineInput(decode_cpu(e), d, thr) for e, d in zip(encoded, depths)]
    return pixels, [EngineInput(e, d, thr) for e, d in zip(encoded, depths)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fastjpeg")
    return random_model_folder(root / "rgbd", input_kind="rgbd", seed=1, min_size=192, max_size=256,
                               score_threshold=0.05)


@pytest.mark.parametrize("options", [{}, {"nms_iterations": 1}],
                         ids=["graph", "redone-op-by-op"])
def test_compressed_inputs_give_the_pixels_answers_on_the_cpu(folder: Path, options: dict) -> None:
    cfg = load_model_config(folder)
    engine = FastMaskRCNN(dataclasses.replace(cfg, engine_options={"allow_cpu": True, **options}), "cpu")
    engine.load()
    assert engine.decodes_jpeg and not engine.decodes_jpeg_on_gpu()
    colors, depths = zip(*(scene(k) for k in range(3)))
    pixels, encoded = _inputs(list(colors), list(depths), 0.05)
    mixed = [encoded[0], pixels[1], encoded[2]]  # a batch may hold both kinds
    want = engine.infer(pixels)
    for got in (engine.infer(encoded), engine.infer(mixed)):
        for w, g in zip(want, got):
            assert len(w.scores) > 0
            assert np.array_equal(w.boxes, g.boxes) and np.array_equal(w.scores, g.scores)
            assert np.array_equal(w.labels, g.labels) and w.rle == g.rle
    if "nms_iterations" in options:  # the images really went the op-by-op way (its own decode)
        assert engine.redone_images > 0


@pytest.mark.gpu
def test_nvjpeg_decoded_inputs_stay_close_to_the_frontends_pixels(request: pytest.FixtureRequest) -> None:
    """The trained demo model on the GPU: detections from nvJPEG's pixels against those from the frontend's
    (libjpeg-turbo) pixels. They do NOT meet the fast engine's parity bounds (measured on an H200, run S6-9:
    202/205 matched, 3 confident unmatched, box p99 1.1 px, scores within 0.057; hence jpeg_decode
    "frontend" by default), so this holds them to what was measured, with room: a channel swap, a
    transposed image or a wrong chroma upsampling would lose most matches."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from dd.synth.scenes import generate_scene

    cfg = load_model_config(DEMO, name="demo-rgbd")
    engine = FastMaskRCNN(dataclasses.replace(cfg, engine="fast", engine_options={}), "cuda:0")
    engine.load()
    request.addfinalizer(engine.close)  # its background captures end before the next test's load
    assert engine.decodes_jpeg_on_gpu()
    scenes = [generate_scene(40_000_000 + k, 640, 480) for k in range(24)]
    pixels, encoded = _inputs([s.color for s in scenes], [s.depth for s in scenes], cfg.score_threshold)
    ref, cand = [], []
    for lo in range(0, len(scenes), 4):  # batches of 4: one nvJPEG call each
        for items, out in ((pixels, ref), (encoded, cand)):
            out += [parity.from_engine(d, 480, 640) for d in engine.infer(items[lo:lo + 4])]
    metrics = parity.compare(ref, cand, cfg.score_threshold)
    print(parity.summary(metrics))
    assert metrics["matched"] >= 0.95 * metrics["reference_detections"], parity.summary(metrics)
    assert metrics["mask_iou_mean"] >= 0.98, parity.summary(metrics)
