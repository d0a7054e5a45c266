"""Canvases (fast/canvases.py): the fast engine's graphs are keyed by the padded network input, and a batch
of any input sizes runs on the smallest canvas that holds them all.

On the CPU the fixed-shape network runs eagerly from the same inputs a graph would read (the canvas and
the per-image numbers), so what is checked here is what a graph replays: the canvas input, bit for bit
today's padded input for an image at its own canvas; every size bound inside the network taken per image
from tensors with the numbers' results; images sharing a canvas getting the answers they get alone; and
a canvas slot that holds nothing of an earlier, larger image.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from dd.config import load_model_config
from dd.models.model_folder import random_model_folder
from dd.models.semantics import DETECTRON2, TORCHVISION
from dd.worker.engines.base import Detections, EngineInput
from dd.worker.engines.fast.canvases import (canvas_of, default_canvases, enclosing, image_row, largest_canvases,
                                             parse_canvases, pick_canvas)
from dd.worker.engines.fast.engine import FastMaskRCNN
from dd.worker.engines.fast.pil_resize import PilBilinear
from tests.conftest import scene
from tests.integration.test_fast_engine import _spread_scores

# The test model resizes to a shorter side of 192, a longer one of at most 256 (as 800/1333 would):
# 240x320 -> 192x256 and 200x300 -> 170x256 share the 192x256 canvas (as 1280x720 and 1920x1080 share
# 768x1344 at 800/1333); 180x320 -> 144x256 has a canvas of its own, 160x256.
MIN, MAX = 192, 256


# -- choosing a canvas ---------------------------------------------------------------------------
def test_the_smallest_holding_canvas_is_picked() -> None:
    canvases = [(768, 1344), (800, 1344), (1344, 800), (480, 640)]
    assert pick_canvas([(768, 1344)], canvases) == (768, 1344)
    assert pick_canvas([(480, 640)], canvases) == (480, 640)
    assert pick_canvas([(480, 672)], canvases) == (768, 1344)  # wider than 480x640: the next that holds it
    assert pick_canvas([(768, 1344), (800, 1088)], canvases) == (800, 1344)  # every image of the batch
    assert pick_canvas([(1344, 768)], canvases) == (1344, 800)  # portrait
    assert pick_canvas([(1344, 768), (768, 1344)], canvases) is None  # one of each: no canvas holds both
    assert enclosing([(1344, 768), (768, 1344)]) == (1344, 1344)
    assert pick_canvas([(832, 1344)], canvases) is None  # beyond every canvas


@pytest.mark.parametrize("semantics", [TORCHVISION, DETECTRON2], ids=["torchvision", "detectron2"])
@pytest.mark.parametrize("limits", [(800, 1333), (416, 1333), (192, 256), (600, 600)])
def test_the_largest_canvases_hold_every_input_size(semantics, limits) -> None:
    """Landscape, portrait, square, extreme aspect ratios, tiny and huge images: the resize rule never
    makes an image that the two largest canvases cannot hold."""
    lo, hi = limits
    largest = largest_canvases(lo, hi)
    rng = np.random.default_rng(lo + hi)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 5000, (3000, 2))]
    sizes += [(720, 1280), (1080, 1920), (480, 640), (1280, 720), (1000, 1000), (1, 4000), (4000, 1), (7, 7)]
    for h, w in sizes:
        need = canvas_of(semantics.resized_size(h, w, lo, hi))
        assert pick_canvas([need], largest) is not None, ((h, w), need, largest)


def test_default_canvases_are_the_warmup_sizes_own_then_the_largest() -> None:
    resize = lambda h, w: TORCHVISION.resized_size(h, w, 800, 1333)  # noqa: E731
    assert default_canvases([[720, 1280], [1080, 1920], [480, 640]], resize, 800, 1333) == [
        (768, 1344), (800, 1088), (800, 1344), (1344, 800)]
    assert largest_canvases(600, 600) == [(608, 608)]


def test_canvases_option_is_checked_and_rounded_up() -> None:
    assert parse_canvases([[800, 1333], [1333, 800], [800, 1344]]) == [(800, 1344), (1344, 800)]
    for bad in ([], [[800]], [[800, 0]], [["800", 1344]], [[True, 1344]], "800x1344"):
        with pytest.raises(ValueError, match="canvases"):
            parse_canvases(bad)


def test_image_row_ratio_is_torchs_float32_division() -> None:
    for h, w, rh, rw in [(720, 1280, 750, 1333), (233, 347, 171, 255), (351, 200, 555, 316), (1080, 1920, 750, 1333)]:
        row = image_row(h, w, rh, rw)
        expected = torch.tensor([w, h, w, h], dtype=torch.float32) / torch.tensor([rw, rh, rw, rh], dtype=torch.float32)
        assert torch.equal(torch.from_numpy(row[2:6]), expected)
        assert row[[0, 1, 6, 7]].tolist() == [rh, rw, h, w]


# -- the engine on canvases ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("canvas")
    random_model_folder(root / "rgbd", input_kind="rgbd", seed=1, min_size=MIN, max_size=MAX, score_threshold=0.05)
    random_model_folder(root / "rgb", input_kind="rgb", seed=2, min_size=MIN, max_size=MAX, score_threshold=0.05)
    for name in ("rgbd", "rgb"):
        _spread_scores(root / name)
    return root


def _engine(folder: Path, **options: object) -> FastMaskRCNN:
    cfg = load_model_config(folder)
    engine = FastMaskRCNN(dataclasses.replace(cfg, engine_options={"allow_cpu": True, **options}), "cpu")
    engine.load()
    return engine


def _item(k: int, h: int, w: int, rgbd: bool = True, threshold: float = 0.05) -> EngineInput:
    color, depth = scene(k, h=h, w=w)
    return EngineInput(color, depth if rgbd else None, threshold)


def _same(a: Detections, b: Detections) -> None:
    assert len(a.scores) > 0
    assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.scores, b.scores)
    assert np.array_equal(a.labels, b.labels) and a.rle == b.rle


@pytest.mark.parametrize("kind", ["rgbd", "rgb-pil"])
def test_an_image_on_its_own_canvas_gets_todays_network_input_bit_for_bit(folders: Path, kind: str) -> None:
    """The canvas slot of an image whose canvas is its exact padded size holds what _normalize + _pad
    made for the whole graph before (RGB-D: float resize with depth; RGB: PIL's resize first)."""
    engine = _engine(folders / ("rgbd" if kind == "rgbd" else "rgb"))
    if kind == "rgb-pil":
        engine._pil = PilBilinear()  # detectron2's uint8 resize, as an RGB detectron2 model has it
    items = [_item(3, 233, 347, kind == "rgbd"), _item(4, 240, 320, kind == "rgbd")]
    for it in items:
        h, w = it.color.shape[:2]
        rh, rw = engine.semantics.resized_size(h, w, MIN, MAX)
        canvas = engine.canvas_for([(h, w)])
        assert canvas == canvas_of((rh, rw))
        g = engine._fixed_graph(1, canvas)
        engine._write_inputs([it], g)
        depth = None if it.depth is None else torch.from_numpy(it.depth)[None]
        expected = engine._normalize(torch.from_numpy(it.color)[None], depth, rh, rw)
        assert torch.equal(g.x, expected)
        assert torch.equal(g.sizes[0], torch.from_numpy(image_row(h, w, rh, rw)))


def test_size_bounds_as_per_image_tensors_give_the_numbers_results(folders: Path) -> None:
    """Proposals, detections and mask probabilities clipped by the per-image tensors a graph captures
    equal those clipped by the Python numbers the graph held before: same clamps, bit for bit."""
    engine = _engine(folders / "rgbd")
    it = _item(5, 240, 320)
    canvas = engine.canvas_for([(240, 320)])
    g = engine._fixed_graph(1, canvas)
    engine._write_inputs([it], g)
    rh, rw = engine.semantics.resized_size(240, 320, MIN, MAX)
    heads = engine.heads
    with torch.inference_mode():
        feats, objectness, deltas = engine._trunk(g.x)
        anchors = engine._anchors_for(ImageList(g.x, [canvas]), list(feats.values()))
        obj, dl = [o.float() for o in objectness], [d.float() for d in deltas]
        bounds = [(rh, rw), (g.sizes[:, 0], g.sizes[:, 1])]
        props = [heads.proposals(obj, dl, anchors, 1, *b) for b in bounds]
        for a, b in zip(*props):
            assert torch.equal(a, b)
        thr = torch.tensor(0.05)
        dets = [heads.detections(feats, props[0][0], props[0][1], *b, thr, False, canvas=canvas) for b in bounds]
        for key in dets[0]:
            assert torch.equal(dets[0][key], dets[1][key]), key
        probs = [heads.mask_probs(feats, dets[0]["boxes"], dets[0]["labels"], *b, False, canvas=canvas) for b in bounds]
        assert torch.equal(*probs)
    assert int(dets[0]["valid"].sum()) > 0


def test_a_batch_of_sizes_sharing_a_canvas_gives_each_image_its_answers_alone(folders: Path) -> None:
    """Bit for bit, pastes at each image's own size included. One bucket (2), so that alone and together
    run the same shapes: convolutions choose their algorithm by batch size, and two batch sizes round
    differently (on the CPU as on a GPU), canvases or not."""
    engine = _engine(folders / "rgbd", batch_buckets=[2])
    items = [_item(1, 240, 320), _item(2, 200, 300, threshold=0.1)]
    assert {engine.canvas_for([it.color.shape[:2]]) for it in items} == {(192, 256)}
    alone = [engine.infer([it])[0] for it in items]
    together = engine.infer(items)
    for a, t in zip(alone, together):
        _same(a, t)
    # and as one started graph (Engine.start), the pipelined worker's way
    assert engine._batch_canvas(items) == (192, 256)
    for a, t in zip(alone, engine.start(items)()):
        _same(a, t)


def test_portrait_and_landscape_in_one_batch_run_as_a_graph_each(folders: Path) -> None:
    """No canvas holds a portrait and a landscape image together (that would take a square canvas of the
    longer side, captured for nothing): the batch runs as one graph per canvas, each image with its
    answers alone."""
    engine = _engine(folders / "rgbd", batch_buckets=[2])
    items = [_item(1, 240, 320), _item(2, 320, 240), _item(3, 200, 300)]
    assert engine._batch_canvas(items) is None and engine._batch_canvas(items[::2]) == (192, 256)
    alone = [engine.infer([it])[0] for it in items]
    for a, t in zip(alone, engine.infer(items)):
        _same(a, t)
    assert engine.canvases == [(192, 192), (192, 256), (256, 192)]  # nothing added


def _twins(a: Detections, b: Detections) -> float:
    """The fraction of a's detections with a twin in b: same label, box within 0.01 px, score within 1e-4."""
    found = 0
    for box, score, label in zip(a.boxes, a.scores, a.labels):
        found += bool(np.any((b.labels == label) & (np.abs(b.boxes - box).max(1) < 0.01)
                             & (np.abs(b.scores - score) < 1e-4)))
    return found / len(a.scores)


def test_an_image_on_a_larger_canvas_gets_close_answers_inside_its_own_bounds(folders: Path) -> None:
    """180x320 (resized 144x256, canvas 160x256) batched with a 240x320 image runs on 192x256: more zero
    padding below it, as torchvision and detectron2 pad an image batched with a larger one. Its own
    pixels are the same, so most detections are the same to float rounding; features within reach of
    the extra padding and proposals over it change, and this model's random weights score every box
    within about 1e-4 of the others (measured: 82-94% of detections the same, the rest near-tied
    boxes trading places at the 50-detection cut), so at least 70% must have an exact twin (one bucket,
    so that only the canvas differs). Every box stays inside the image: the bounds are the image's own
    (144x256 resized), not the canvas's."""
    engine = _engine(folders / "rgbd", batch_buckets=[2], canvases=[[160, 256], [192, 256], [256, 192]])
    large = _item(7, 240, 320)
    assert engine.canvas_for([(180, 320)]) == (160, 256)
    assert engine.canvas_for([(180, 320), (240, 320)]) == (192, 256)
    fractions = []
    for k in range(3):
        small = _item(k, 180, 320)
        own = engine.infer([small])[0]
        padded_more = engine.infer([small, large])[0]
        assert len(own.scores) and len(padded_more.scores)
        fractions.append(min(_twins(own, padded_more), _twins(padded_more, own)))
        assert padded_more.boxes[:, 3].max() <= 180 + 1e-3 and padded_more.boxes[:, 2].max() <= 320 + 1e-3
    assert min(fractions) >= 0.7, fractions


def test_a_slot_keeps_nothing_of_an_earlier_larger_image(folders: Path) -> None:
    """One canvas for every landscape size: a 240x320 image fills slot 0 of 192x256, then a 180x320
    image (144x256) takes that slot: the rows below it must be zero again, and its answers those of
    an engine that never saw the larger image."""
    options = {"canvases": [[192, 256], [256, 192]], "batch_buckets": [1]}
    engine = _engine(folders / "rgbd", **options)
    fresh = _engine(folders / "rgbd", **options)
    large, small = _item(7, 240, 320), _item(0, 180, 320)
    engine.infer([large])
    g = engine._fixed_graphs[(1, 192, 256)]
    assert g.x[0, :, 144:].abs().sum() > 0  # the larger image is there
    got = engine.infer([small])[0]
    assert torch.count_nonzero(g.x[0, :, 144:]) == 0
    _same(fresh.infer([small])[0], got)
    # narrower than the canvas too: a portrait slot after a landscape image in it, columns right of it zero
    tall = _item(2, 320, 180)
    engine.infer([_item(3, 320, 240)])
    engine.infer([tall])
    gp = engine._fixed_graphs[(1, 256, 192)]
    assert torch.count_nonzero(gp.x[0, :, :, 144:]) == 0
    _same(fresh.infer([tall])[0], engine.infer([tall])[0])


def test_a_size_beyond_every_canvas_runs_on_its_own_and_says_so(folders: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    engine = _engine(folders / "rgbd", canvases=[[160, 256]])
    assert engine.canvas_for([(180, 320)]) == (160, 256)
    with caplog.at_level("WARNING"):
        assert engine.canvas_for([(240, 320)]) == (192, 256)
    assert "fit none of the canvases" in caplog.text and "320x240" in caplog.text
    assert (192, 256) in engine.canvases  # later batches of that size find it
    (det,) = engine.infer([_item(1, 240, 320)])
    assert len(det.scores) > 0


def test_exact_canvases_run_each_image_on_its_own_padded_size(folders: Path) -> None:
    """exact_canvases (parity checks): a batch of two padded sizes runs as two graphs, each image with the
    answers it gets alone on its own canvas, bit for bit (one bucket: same shapes)."""
    engine = _engine(folders / "rgbd", batch_buckets=[2], exact_canvases=True)
    by_default = _engine(folders / "rgbd", batch_buckets=[2], canvases=[[160, 256], [192, 256], [256, 192]])
    items = [_item(0, 180, 320), _item(7, 240, 320), _item(1, 180, 320)]
    assert engine._batch_canvas(items) is None and engine._batch_canvas(items[::2]) == (160, 256)
    assert by_default._batch_canvas(items) == (192, 256)
    for own, got in zip([by_default.infer([it])[0] for it in items], engine.infer(items)):
        _same(own, got)
    for own, got in zip([by_default.infer([it])[0] for it in items[::2]], engine.start(items[::2])()):
        _same(own, got)


@pytest.mark.gpu
def test_on_a_gpu_the_canvas_graph_reads_each_images_sizes(folders: Path, request: pytest.FixtureRequest) -> None:
    """The captured graph against the same network op by op (cuda_graphs false), on images of three sizes
    that share one canvas: each image's sizes are tensors the graph reads at every replay, not numbers
    baked in at capture (the capture saw canvas-filling images), so each box stays inside its own image
    and the graph's answers are the op-by-op ones."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    options = {"warmup_sizes": [[240, 320]], "batch_buckets": [1, 4], "max_canvases_at_load": True}
    graphs = _engine_on(folders / "rgbd", "cuda:0", **options)
    eager = _engine_on(folders / "rgbd", "cuda:0", cuda_graphs=False, **options)
    request.addfinalizer(graphs.close)
    request.addfinalizer(eager.close)
    assert graphs._graph_cache.get((4, 192, 256)) is not None and graphs._graph_cache.pending() == 0
    items = [_item(1, 240, 320), _item(2, 200, 300), _item(3, 180, 320)]
    assert graphs._batch_canvas(items) == (192, 256)
    for got, want, it in zip(graphs.infer(items), eager.infer(items), items):
        h, w = it.color.shape[:2]
        assert len(got.scores) == len(want.scores) > 0
        np.testing.assert_allclose(got.boxes, want.boxes, atol=1e-2)
        assert got.boxes[:, 3].max() <= h + 1e-3 and got.boxes[:, 2].max() <= w + 1e-3


def _engine_on(folder: Path, device: str, **options: object) -> FastMaskRCNN:
    cfg = load_model_config(folder)
    engine = FastMaskRCNN(dataclasses.replace(cfg, engine_options=options), device)
    engine.load()
    return engine


def test_buckets_at_load_must_name_batch_buckets(folders: Path) -> None:
    """Checked on every device, so that a folder that would fail on the GPU fails in a CPU test too."""
    for bad in ([3], [], [1, 16]):
        with pytest.raises(ValueError, match="buckets_at_load"):
            _engine(folders / "rgbd", batch_buckets=[1, 2, 4], buckets_at_load=bad)
    assert _engine(folders / "rgbd", batch_buckets=[1, 2, 4], buckets_at_load=[4, 1]).infer([_item(1, 240, 320)])


@pytest.mark.gpu
def test_on_a_gpu_buckets_left_out_at_load_come_in_the_background(folders: Path,
                                                                 request: pytest.FixtureRequest) -> None:
    """buckets_at_load [1]: bucket 4 is not captured at load but queued, and a batch of 3 gets the same
    answers before its graph is there (op by op) and after."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    options = {"warmup_sizes": [[240, 320]], "batch_buckets": [1, 4]}
    engine = _engine_on(folders / "rgbd", "cuda:0", buckets_at_load=[1], **options)
    request.addfinalizer(engine.close)
    items = [_item(1, 240, 320), _item(2, 240, 320), _item(3, 240, 320)]
    canvas = engine.canvas_for([(240, 320)])
    early = engine.infer(items)
    assert engine._graph_cache.wait_idle(120)
    assert engine._graph_cache.get((4, *canvas)) is not None and engine._graph_cache.get((1, *canvas)) is not None
    for a, b in zip(early, engine.infer(items)):
        assert len(a.scores) == len(b.scores) > 0
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-2)


def _started_two_deep(engine: FastMaskRCNN, batches: list[list[EngineInput]]) -> list[list[Detections]]:
    """As the worker's pipeline calls the engine: batch k+1 is started before batch k is finished."""
    finishes = [engine.start(batches[0])]
    answers = []
    for batch in batches[1:]:
        finishes.append(engine.start(batch))
        answers.append(finishes.pop(0)())
    answers.append(finishes.pop(0)())
    return answers


def test_a_batch_started_before_the_last_is_finished_leaves_its_answers_alone(folders: Path) -> None:
    """The pipelined worker starts batch k+1 (same bucket, same canvas: the same graph on a GPU) before it
    finishes batch k; each batch gets the answers it gets alone."""
    engine = _engine(folders / "rgbd", batch_buckets=[2])
    batches = [[_item(1, 240, 320), _item(2, 200, 300)], [_item(3, 240, 320), _item(4, 240, 320)],
               [_item(5, 200, 300)]]
    alone = [engine.infer(b) for b in batches]
    for want, got in zip(alone, _started_two_deep(engine, batches)):
        for a, b in zip(want, got):
            _same(a, b)


@pytest.mark.gpu
def test_on_a_gpu_a_graph_replayed_again_before_its_answers_are_read_keeps_them(
        folders: Path, request: pytest.FixtureRequest) -> None:
    """Batch k+1's replay of the same graph overwrites the graph's outputs: batch k's answers must have
    been copied out behind its own replay (a read after the next replay got batch k+1's detections),
    and batch k's masks, pasted on their own stream beside k+1's network, must be k's."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    engine = _engine_on(folders / "rgbd", "cuda:0", warmup_sizes=[[240, 320]], batch_buckets=[2],
                        max_canvases_at_load=True)
    request.addfinalizer(engine.close)
    batches = [[_item(1, 240, 320), _item(2, 240, 320)], [_item(3, 240, 320), _item(4, 200, 300)],
               [_item(5, 240, 320), _item(6, 240, 320)]]
    assert engine._graph_cache.get((2, *engine.canvas_for([(240, 320)]))) is not None
    alone = [engine.infer(b) for b in batches]
    for _ in range(3):  # the device's timing varies; the answers may not
        for want, got in zip(alone, _started_two_deep(engine, batches)):
            for a, b in zip(want, got):
                _same(a, b)
