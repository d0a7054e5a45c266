"""Input graphs (dd/worker/engines/fast/input_graphs.py): which batches get one, and on a GPU (gpu marker) that a
batch prepared by one gets exactly the answers of the same batch prepared op by op, whatever came before it in
the same slots (a larger image, a smaller one, a batch of another size) and before and after its graph was
captured in the background."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from dd.png_rows import PngRows
from dd.synth.scenes import generate_scene
from dd.worker.engines.base import EncodedImage, EngineInput
from dd.worker.engines.fast.input_graphs import PNG_ROWS, InputGraph, buffers, copy_in, input_key

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "configs" / "models" / "demo-rgbd"


def _rows(h: int, w: int, fill: int = 0) -> PngRows:
    return PngRows(np.full((h, 1 + 2 * w), fill, np.uint8), h, w)


def test_a_batch_of_one_size_and_depth_kind_has_a_key() -> None:
    c = np.zeros((48, 64, 3), np.uint8)
    assert input_key([c, c], [np.zeros((48, 64), np.uint16)] * 2, True) == (48, 64, "<u2")
    assert input_key([c], [np.zeros((48, 64), np.float32)], True) == (48, 64, "<f4")
    assert input_key([c, c], [_rows(48, 64)] * 2, True) == (48, 64, PNG_ROWS)
    assert input_key([c], [None], False) == (48, 64, None)  # an RGB model: depth is not read


@pytest.mark.parametrize("case", ["sizes", "depth kinds", "depth dtypes", "no depth", "depth size", "rows size",
                                  "jpeg", "gray", "empty"])
def test_other_batches_have_none(case: str) -> None:
    c, small = np.zeros((48, 64, 3), np.uint8), np.zeros((40, 64, 3), np.uint8)
    d = np.zeros((48, 64), np.uint16)
    colors, depths = {
        "sizes": ([c, small], [d, np.zeros((40, 64), np.uint16)]),
        "depth kinds": ([c, c], [d, _rows(48, 64)]),
        "depth dtypes": ([c, c], [d, d.astype(np.float32)]),
        "no depth": ([c], [None]),
        "depth size": ([c], [np.zeros((40, 64), np.uint16)]),
        "rows size": ([c], [_rows(40, 64)]),
        "jpeg": ([EncodedImage(np.zeros(10, np.uint8), 48, 64)], [d]),
        "gray": ([np.zeros((48, 64, 1), np.uint8)], [d]),
        "empty": ([], []),
    }[case]
    assert input_key(colors, depths, True) is None


def test_images_are_copied_into_their_slots() -> None:
    cpu = torch.device("cpu")
    color, depth = buffers(4, 3, 5, PNG_ROWS, cpu)
    assert color.shape == (4, 3, 5, 3) and depth is not None and depth.shape == (4, 3, 11)
    entry = InputGraph(color, depth, (3, 5), None)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    colors = [rng.integers(0, 255, (3, 5, 3), dtype=np.uint8) for _ in range(2)]
    rows = [PngRows(rng.integers(0, 255, (3, 11), dtype=np.uint8), 3, 5) for _ in range(2)]
    copy_in(entry, colors, rows)
    for i in range(2):
        assert np.array_equal(color[i].numpy(), colors[i]) and np.array_equal(depth[i].numpy(), rows[i].data)
    assert not color[2:].any() and not depth[2:].any(), "slots past the batch keep what they had"
    pixels = buffers(2, 3, 5, "<u2", cpu)[1]
    assert pixels is not None and pixels.dtype == torch.uint16 and pixels.shape == (2, 3, 5)
    assert buffers(2, 3, 5, None, cpu)[1] is None


def test_a_capture_that_fails_at_load_leaves_the_inputs_op_by_op(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """An input graph is an optimisation: where one cannot be captured at load (an operation CUDA will not
    record, say), the engine warns, prepares its inputs op by op, and loads. On the CPU, with the capture
    made to fail and a network graph stood in for."""
    from dd.config import load_model_config
    from dd.models.model_folder import random_model_folder
    from dd.worker.engines.fast.engine import FastMaskRCNN

    cfg = load_model_config(random_model_folder(tmp_path / "m", input_kind="rgbd", seed=1, min_size=64,
                                                max_size=96))
    engine = FastMaskRCNN(dataclasses.replace(cfg, engine_options={"allow_cpu": True}), "cpu")
    engine.load()
    assert not engine.input_graphs, "no CUDA graphs on the CPU"
    engine._loaded, engine.input_graphs = False, True  # as at load on a GPU
    tried = []

    def fail(key: tuple) -> None:
        tried.append(key)
        raise RuntimeError("operation not permitted when stream is capturing")

    engine._capture_inputs = fail  # type: ignore[method-assign]
    g = engine._fixed_graph(1, engine.canvas_for([(48, 64)]))
    g.graph = object()  # type: ignore[assignment]  # a captured network
    items = [EngineInput(np.zeros((48, 64, 3), np.uint8), np.zeros((48, 64), np.uint16), 0.5)]
    with caplog.at_level(logging.WARNING, logger="dd.worker.engines.fast.engine"):
        assert engine._write_through_graph(items, g) is False
        assert engine._write_through_graph(items, g) is False
    assert not engine.input_graphs and len(tried) == 1
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "the input preparation for 1 image(s) of 64x48" in warning and "op by op" in warning


def _same(want, got, what: str) -> None:
    assert len(want) == len(got), what
    for w, g in zip(want, got):
        assert np.array_equal(w.boxes, g.boxes) and np.array_equal(w.scores, g.scores), what
        assert np.array_equal(w.labels, g.labels) and w.rle == g.rle, what


@pytest.mark.gpu
def test_input_graphs_give_the_op_by_op_answers(request: pytest.FixtureRequest) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from dd.config import load_model_config
    from dd.worker.engines.fast.engine import FastMaskRCNN
    from tests.png_writer import filtered_rows, random_filters

    cfg = load_model_config(DEMO, name="demo-rgbd")
    engines = {}
    for graphs in (True, False):
        engine = FastMaskRCNN(dataclasses.replace(cfg, engine="fast", engine_options={
            "warmup_sizes": [[480, 640]], "input_graphs": graphs}), "cuda:0")
        engine.load()
        request.addfinalizer(engine.close)
        # Its background captures (the largest canvases) done before the other engine loads or runs: CUDA's
        # capture mode is global while a network records, and the other engine does not wait for it.
        assert engine._graph_cache.wait_idle(120)
        engines[graphs] = engine
    graphed, plain = engines[True], engines[False]

    def rows_of(depth: np.ndarray, seed: int) -> PngRows:
        h, w = depth.shape
        data = filtered_rows(depth, random_filters(np.random.default_rng(seed), h))
        return PngRows(np.frombuffer(bytearray(data), np.uint8).reshape(h, 1 + 2 * w), h, w)

    big = [generate_scene(7000 + k, 640, 480) for k in range(5)]
    small = [generate_scene(8000 + k, 600, 400) for k in range(3)]  # on the same canvas, with zeros below
    px = [EngineInput(s.color, s.depth, cfg.score_threshold) for s in big + small]
    rows = [EngineInput(s.color, rows_of(s.depth, k), cfg.score_threshold) for k, s in enumerate(big + small)]
    assert graphed.buckets == [1, 2, 4], "the demo model's MAX_BATCH_SIZE is 4"
    b, s = slice(0, 4), slice(5, 8)

    def canvas(engine: FastMaskRCNN, batch: list[EngineInput]) -> tuple[torch.Tensor, torch.Tensor]:
        """The network input the batch left: its images' slots of the canvas and their numbers."""
        n = len(batch)
        bucket = next(b for b in engine.buckets if b >= n)
        g = engine._graph_cache.ready((bucket, *engine.canvas_for([x.color.shape[:2] for x in batch])))
        return g.x[:n].clone(), g.sizes[:n].clone()

    def replays() -> int:
        return sum(e.replays for e in graphed._graph_cache._ready.values() if isinstance(e, InputGraph))

    cases = [("1 image, pixels", px[:1]), ("1 image, rows", rows[:1]), ("3 images in a bucket of 4", rows[1:4]),
             ("a smaller size, before its graph", px[s]), ("the larger again", px[:1]),
             ("mixed sizes", [px[0], px[6]]), ("1 smaller image", px[6:7]), ("the largest bucket", rows[b])]
    later = [("the smaller size, graphed", px[s]), ("the larger after it", rows[1:2]),
             ("the smaller after it", px[6:7])]
    # The plain engine's answers first: the graphed one then captures in the background with no other
    # engine's work beside it (a worker holds one engine).
    want = {what: (plain.infer(batch), canvas(plain, batch)) for what, batch in cases + later}

    def check(what: str, batch: list[EngineInput]) -> None:
        answers, (x, sizes) = want[what]
        got = graphed.infer(batch)
        gx, gsizes = canvas(graphed, batch)
        assert torch.equal(gx, x) and torch.equal(gsizes, sizes), f"{what}: not the same network input"
        _same(answers, got, what)

    for what, batch in cases:
        check(what, batch)
    assert graphed._graph_cache.wait_idle(120)
    before = replays()
    for what, batch in later:
        check(what, batch)
    assert replays() == before + 3, "each batch of one size and depth kind ran through an input graph"
    assert sum(e.replays for e in plain._graph_cache._ready.values() if isinstance(e, InputGraph)) == 0


@pytest.mark.gpu
def test_a_detectron2_rgb_models_pil_resize_runs_in_the_input_graph(tmp_path: Path,
                                                                   request: pytest.FixtureRequest) -> None:
    """detectron2 resizes an RGB image as PIL resizes uint8 (pil_resize.py: a pass of taps per axis, the
    most kernels of any preparation): recorded in an input graph, the network input is the same bit for
    bit as op by op, and so are the answers."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from dd.config import load_model_config
    from dd.worker.engines.fast.engine import FastMaskRCNN
    from tests.conftest import scene
    from tests.d2_folders import write_d2_folder

    cfg = load_model_config(write_d2_folder(tmp_path / "d2-rgb", kind="rgb"))
    engines = {}
    for graphs in (True, False):
        engine = FastMaskRCNN(dataclasses.replace(cfg, engine="fast", engine_options={
            "warmup_sizes": [[233, 347]], "input_graphs": graphs, "max_canvases_at_load": True}), "cuda:0")
        engine.load()
        request.addfinalizer(engine.close)
        engines[graphs] = engine
    graphed, plain = engines[True], engines[False]
    assert graphed._pil is not None, "a detectron2 RGB model resizes as PIL does"
    colors = [scene(k, 233, 347)[0] for k in range(4)]
    before = sum(e.replays for e in graphed._graph_cache._ready.values() if isinstance(e, InputGraph))
    for n in (1, 2, 3):
        batch = [EngineInput(c, None, 0.0) for c in colors[:n]]
        answers = []
        inputs = []
        for engine in (plain, graphed):
            answers.append(engine.infer(batch))
            bucket = next(b for b in engine.buckets if b >= n)
            g = engine._graph_cache.ready((bucket, *engine.canvas_for([(233, 347)])))
            inputs.append((g.x[:n].clone(), g.sizes[:n].clone()))
        assert torch.equal(inputs[0][0], inputs[1][0]) and torch.equal(inputs[0][1], inputs[1][1]), n
        _same(answers[0], answers[1], f"{n} image(s)")
    assert sum(e.replays for e in graphed._graph_cache._ready.values() if isinstance(e, InputGraph)) == before + 3
