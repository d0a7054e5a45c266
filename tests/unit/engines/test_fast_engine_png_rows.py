"""The fast engine given 16-bit PNG depths as their filtered rows (PngRows): exactly the answers it gives for
their pixels, on every path (graph, op by op, images redone), on the CPU here and on a GPU (gpu marker:
the reconstruction is exact, so the answers are the same bytes there too)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from dd.config import load_model_config
from dd.models.model_folder import random_model_folder
from dd.png_rows import PngRows
from dd.synth.scenes import generate_scene
from dd.worker.engines.base import EngineInput
from dd.worker.engines.fast.engine import FastMaskRCNN
from dd.worker.engines.png_unfilter import unfilter_rows
from tests.conftest import scene
from tests.png_writer import filtered_rows, random_filters

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "configs" / "models" / "demo-rgbd"


def _rows(depth: np.ndarray, seed: int) -> PngRows:
    h, w = depth.shape
    data = filtered_rows(depth, random_filters(np.random.default_rng(seed), h))
    return PngRows(np.frombuffer(bytearray(data), np.uint8).reshape(h, 1 + 2 * w), h, w)


def _same(want, got) -> None:
    for w, g in zip(want, got):
        assert np.array_equal(w.boxes, g.boxes) and np.array_equal(w.scores, g.scores)
        assert np.array_equal(w.labels, g.labels) and w.rle == g.rle


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fastrows")
    return random_model_folder(root / "rgbd", input_kind="rgbd", seed=1, min_size=192, max_size=256,
                               score_threshold=0.05)


@pytest.mark.parametrize("options", [{}, {"nms_iterations": 1}, {"fixed_shapes": False}],
                         ids=["graph", "redone-op-by-op", "eager"])
def test_rows_give_the_pixels_answers_on_the_cpu(folder: Path, options: dict) -> None:
    cfg = load_model_config(folder)
    engine = FastMaskRCNN(dataclasses.replace(cfg, engine_options={"allow_cpu": True, **options}), "cpu")
    engine.load()
    assert engine.unfilters_png_rows and not engine.unfilters_png_rows_on_gpu()
    colors, depths = zip(*(scene(k) for k in range(3)))
    pixels = [EngineInput(c, d, 0.05) for c, d in zip(colors, depths)]
    rows = [EngineInput(c, _rows(d, k), 0.05) for k, (c, d) in enumerate(zip(colors, depths))]
    mixed = [rows[0], pixels[1], rows[2]]  # a batch may hold both kinds
    want = engine.infer(pixels)
    assert all(len(w.scores) > 0 for w in want)
    for got in (engine.infer(rows), engine.infer(mixed)):
        _same(want, got)
    if "nms_iterations" in options:  # the images really went the op-by-op way too
        assert engine.redone_images > 0


@pytest.mark.gpu
def test_rows_on_the_gpu(request: pytest.FixtureRequest) -> None:
    """On CUDA: the reconstruction equals the CPU's for full-size frames, and the trained demo model gives
    the same answers for rows as for pixels (pinned ring memory is not needed for that)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    dev = torch.device("cuda:0")
    for seed in range(3):
        depth = generate_scene(50_000 + seed, 1280, 720).depth
        rows = _rows(depth, seed)
        got = unfilter_rows(torch.from_numpy(rows.data).to(dev), 1280)
        assert got.dtype == torch.uint16 and np.array_equal(got.cpu().numpy(), depth)
    cfg = load_model_config(DEMO, name="demo-rgbd")
    engine = FastMaskRCNN(dataclasses.replace(cfg, engine="fast", engine_options={}), "cuda:0")
    engine.load()
    request.addfinalizer(engine.close)  # its background captures end before the next test's load
    assert engine.unfilters_png_rows_on_gpu()
    scenes = [generate_scene(40_000_000 + k, 640, 480) for k in range(8)]
    pixels = [EngineInput(s.color, s.depth, cfg.score_threshold) for s in scenes]
    rows = [EngineInput(s.color, _rows(s.depth, k), cfg.score_threshold) for k, s in enumerate(scenes)]
    for lo in range(0, len(scenes), 4):
        _same(engine.infer(pixels[lo:lo + 4]), engine.infer(rows[lo:lo + 4]))


def test_load_warms_the_compressed_inputs_paths(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """warmup_compressed (on by default on a GPU): the load runs one JPEG and one depth as PNG rows through
    the engine, so that nvJPEG's set-up and the rows' first kernel launches are not paid by the first
    requests after SERVING (about 80 ms each on the H200 before, run S9-1). Off: neither path runs at load."""
    import dd.worker.engines.fast.engine as fast_engine
    from dd.worker.engines.base import EncodedImage

    seen: list[str] = []
    decode, into = fast_engine.decode_to_device, fast_engine.depths_into
    monkeypatch.setattr(fast_engine, "decode_to_device", lambda images, dev: (
        seen.extend(type(i).__name__ for i in images), decode(images, dev))[1])
    monkeypatch.setattr(fast_engine, "depths_into", lambda depths, out: (
        seen.extend(type(d).__name__ for d in depths), into(depths, out))[1])
    cfg = load_model_config(folder)
    for on in (False, True):
        seen.clear()
        engine = FastMaskRCNN(dataclasses.replace(cfg, engine_options={
            "allow_cpu": True, "warmup_compressed": on, "warmup_sizes": [[200, 240]]}), "cpu")
        engine.load()
        assert (EncodedImage.__name__ in seen, PngRows.__name__ in seen) == (on, on), seen
