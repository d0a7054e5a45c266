"""Masks pasted and encoded inside the network's graph (kernels/fixed_rle.py, the fast engine's graph_masks).

On the CPU, in Triton's interpreter: for a batch of images of different sizes, every detection slot's
string is the one masks.paste_and_encode gives for that image (torchvision's and detectron2's paste rules,
boxes across the edges, an empty and a speckled mask), a slot that is not valid gets an empty mask's
string, and a batch over a capacity is reported as such. The engine's host side, on the CPU: each image
takes its kept slots' strings, and a batch over a capacity (changes, tiles, or the text's) is counted,
warned about and left to the paste after the graph. On a GPU (gpu marker): the engine with
graph_masks gives exactly the answers it gives without, takes the strings from the graph, and pastes a
batch over the capacities after the graph instead, with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dd.worker.engines.base import EngineInput, RleText

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "configs" / "models" / "demo-rgbd"

SCRIPT = r"""
import numpy as np
import torch

from dd.worker.engines.kernels import fixed_rle
from dd.worker.engines.masks import paste_and_encode, rle_encode

g = torch.Generator().manual_seed(0)


def smooth(n, size=28):
    return torch.nn.functional.avg_pool2d(torch.rand(n, 1, size, size, generator=g), 5, 1, 2)[:, 0] * 1.4 - 0.2


sizes = [(97, 131), (60, 80), (150, 210)]  # one image each; d detection slots per image
d = 12
n = len(sizes) * d
masks = smooth(n)
masks[5] = torch.rand(28, 28, generator=g)  # speckled: many changes
masks[7] = 0.0  # empty
masks[8] = 1.0  # full: runs that wrap from one column into the next
boxes = []
for h, w in sizes:
    x0 = torch.rand(d, generator=g) * (w + 40) - 30
    y0 = torch.rand(d, generator=g) * (h + 30) - 20
    s = 2 ** (torch.rand(d, generator=g) * 7) - 0.5
    bx = torch.stack([x0, y0, x0 + s, y0 + s * (0.3 + torch.rand(d, generator=g))], 1)
    bx[0] = torch.tensor([0.0, 0.0, w, h])  # the whole image
    bx[1] = torch.tensor([-15.0, -10.0, 30.0, 20.0])  # across the top-left corner
    bx[2] = torch.tensor([w - 20.0, h - 15.0, w + 25.0, h + 30.0])  # across the bottom-right one
    boxes.append(bx)
boxes = torch.cat(boxes)
valid = torch.rand(n, generator=g) > 0.25
valid[:3] = True
valid[8] = True
heights = torch.tensor([h for h, w in sizes for _ in range(d)], dtype=torch.float32)
widths = torch.tensor([w for h, w in sizes for _ in range(d)], dtype=torch.float32)
for rule in ("torchvision", "detectron2"):
    b = boxes.clone()
    if rule == "detectron2":  # its boxes come clipped to the image
        b[:, 0::2] = torch.minimum(b[:, 0::2].clamp(min=0), widths[:, None])
        b[:, 1::2] = torch.minimum(b[:, 1::2].clamp(min=0), heights[:, None])
    head, text = fixed_rle.encode(masks, b, valid, heights, widths, 0.5, changes=20000, tiles=2000, rule=rule,
                                  programs=3)
    head = head.numpy()
    assert fixed_rle.fits(head), (rule, head[-4:])
    assert head[n] == sum(head[i + 1] - head[i] for i in range(n)), "the last bound is the text's size"
    strings = [bytes(text[head[i]:head[i + 1]].numpy()) for i in range(n)]
    for k, (h, w) in enumerate(sizes):
        own = slice(k * d, (k + 1) * d)
        idx = np.flatnonzero(valid[own].numpy())
        want = paste_and_encode(masks[own][idx], b[own][idx].numpy(), h, w, 0.5, rule=rule)
        assert list(want) == [strings[k * d + i] for i in idx], (rule, k)
        empty = rle_encode(np.zeros((1, h, w), bool))[0]
        assert all(strings[k * d + i] == empty for i in np.flatnonzero(~valid[own].numpy())), (rule, k)
    print(rule, "ok")

# One instance (the binary searches' shortest), on images one pixel high or wide.
for h, w in ((1, 5), (7, 1)):
    for rule in ("torchvision", "detectron2"):
        one = torch.rand(1, 14, 14, generator=g)
        box = torch.tensor([[0.4, 0.2, min(w, 3.0), min(h, 2.0)]])
        head, text = fixed_rle.encode(one, box, torch.ones(1, dtype=torch.bool), torch.tensor([float(h)]),
                                      torch.tensor([float(w)]), 0.5, 100, 10, rule=rule, programs=2)
        head = head.numpy()
        assert fixed_rle.fits(head)
        assert [bytes(text[:head[1]].numpy())] == list(paste_and_encode(one, box.numpy(), h, w, 0.5, rule=rule))

# Over a capacity: reported, whichever it is.
for changes, tiles in ((50, 2000), (20000, 3)):
    head, _ = fixed_rle.encode(masks, boxes, valid, heights, widths, 0.5, changes=changes, tiles=tiles, programs=2)
    assert not fixed_rle.fits(head.numpy()), (changes, tiles)
# Nothing valid: every string is an empty mask's.
head, text = fixed_rle.encode(masks, boxes, torch.zeros(n, dtype=torch.bool), heights, widths, 0.5, 100, 10,
                              programs=2)
head = head.numpy()
assert fixed_rle.fits(head) and head[n + 1] == 0 and head[n + 2] == 0
assert bytes(text[head[0]:head[1]].numpy()) == rle_encode(np.zeros((1, 97, 131), bool))[0]
print("ok")
"""


def test_fixed_shape_strings_are_the_paste_and_encode_ones() -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and out.stdout.split()[-1] == "ok", out.stderr[-3000:]


def test_taking_strings_views_consecutive_ones_and_copies_others() -> None:
    strings = RleText(np.frombuffer(b"aabbbcdddd", np.uint8), [0, 2, 5, 6, 10])
    view = strings.take(np.array([1, 2]))
    assert list(view) == [b"bbb", b"c"] and view.views()[0].obj is strings.views()[0].obj
    assert list(strings.take(np.array([0, 3]))) == [b"aa", b"dddd"]
    assert list(strings.take(np.array([], np.int64))) == []


def _graph_answers(strings: list[list[bytes]], needed: tuple[int, int], capacity: tuple[int, int]):
    """An _Answers as a graph leaves it: every slot's string in one text, the head with the bounds, what the
    batch needed and the capacities (fixed_rle.encode's layout)."""
    from dd.worker.engines.fast.engine import _Answers
    from dd.worker.engines.kernels import fixed_rle

    flat = [x for image in strings for x in image]
    bounds = np.concatenate([[0], np.cumsum([len(x) for x in flat])])
    head = np.concatenate([bounds, needed, capacity]).astype(np.int64)
    assert len(head) == len(flat) + 1 + fixed_rle.HEAD_EXTRA
    text = torch.from_numpy(np.frombuffer(b"".join(flat) + b"\0" * 16, np.uint8).copy())
    return _Answers(torch.zeros(len(strings), 1), None, len(strings[0]), None, torch.from_numpy(head), text)


def test_each_image_takes_its_kept_slots_strings_and_a_batch_over_capacity_is_pasted_after(
        caplog: pytest.LogCaptureFixture) -> None:
    """The engine's side of graph_masks on the host (the GPU tests run all of it): each image's kept
    detections take their slots' strings; a batch that did not fit is counted, warned about, and left to
    the paste after the graph."""
    from types import SimpleNamespace

    from dd.worker.engines.base import Detections
    from dd.worker.engines.fast.engine import FastMaskRCNN

    engine = SimpleNamespace(_paste_stream=None, masks_over_capacity=0, mask_changes=0.75)
    strings = [[b"a0", b"a11", b"a222"], [b"b0", b"b11", b"b222"]]
    results = [Detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), None, []) for _ in range(2)]
    by_size = {(40, 50): [(0, np.array([0, 1, 2]))], (30, 20): [(1, np.array([0, 2]))]}
    took = FastMaskRCNN._strings_from_graph(engine, _graph_answers(strings, (90, 9), (100, 10)), results, by_size)
    assert took and list(results[0].rle) == strings[0] and list(results[1].rle) == [b"b0", b"b222"]
    assert isinstance(results[0].rle, RleText) and engine.masks_over_capacity == 0
    for needed in ((101, 9), (90, 11)):  # more changes, more tiles than the graph holds
        with caplog.at_level(logging.WARNING):
            assert not FastMaskRCNN._strings_from_graph(engine, _graph_answers(strings, needed, (100, 10)), results,
                                                        by_size)
    assert engine.masks_over_capacity == 2
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "1 batch(es) so far" in warning and "raise ENGINE_OPTIONS mask_changes (now 0.75)" in warning
    assert FastMaskRCNN._strings_from_graph(engine, _graph_answers(strings, (100, 10), (100, 10)), results, by_size)
    # The text's own capacity: 3 bytes per change and 7 per slot (fixed_rle.text_capacity).
    long = [[b"x" * 40] * 3, [b"y" * 40] * 3]
    assert not FastMaskRCNN._strings_from_graph(engine, _graph_answers(long, (10, 1), (20, 10)), results, by_size)
    assert engine.masks_over_capacity == 3


def test_a_non_positive_mask_changes_is_refused_at_load() -> None:
    from dd.config import load_model_config
    from dd.worker.engines.fast.engine import FastMaskRCNN

    cfg = load_model_config(DEMO, name="demo-rgbd")
    engine = FastMaskRCNN(dataclasses.replace(cfg, engine="fast", engine_options={"allow_cpu": True,
                                                                                  "mask_changes": 0}), "cpu")
    with pytest.raises(ValueError, match="mask_changes must be positive"):
        engine.load()


def _same(want, got, what: str) -> None:
    assert len(want) == len(got), what
    for w, g in zip(want, got):
        assert np.array_equal(w.boxes, g.boxes) and np.array_equal(w.scores, g.scores), what
        assert np.array_equal(w.labels, g.labels) and w.rle == g.rle, what


def _engines(cfg, options: dict, variants: dict[str, dict], request: pytest.FixtureRequest) -> dict:
    from dd.worker.engines.fast.engine import FastMaskRCNN

    engines = {}
    for label, extra in variants.items():
        engine = FastMaskRCNN(dataclasses.replace(cfg, engine="fast", engine_options={**options, **extra}), "cuda:0")
        engine.load()
        request.addfinalizer(engine.close)
        assert engine._graph_cache.wait_idle(120)  # no capture beside the next engine's work
        engines[label] = engine
    return engines


def _count_graph_strings(engine, counts: list[bool]) -> None:
    inner = engine._strings_from_graph

    def counted(*args, **kwargs):
        took = inner(*args, **kwargs)
        counts.append(took)
        return took
    engine._strings_from_graph = counted


@pytest.mark.gpu
def test_graph_masks_give_the_answers_of_the_paste_after_the_graph(request: pytest.FixtureRequest,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from dd.config import load_model_config
    from dd.synth.scenes import generate_scene

    cfg = load_model_config(DEMO, name="demo-rgbd")
    engines = _engines(cfg, {"warmup_sizes": [[480, 640]], "max_canvases_at_load": True},
                       {"plain": {"graph_masks": False}, "graph": {}, "small": {"mask_changes": 1e-4},
                        "upto2": {"graph_masks_max_bucket": 2}}, request)
    plain, graphed, small, upto2 = engines["plain"], engines["graph"], engines["small"], engines["upto2"]
    assert graphed.graph_masks and not plain.graph_masks
    scenes = [generate_scene(7100 + k, 640, 480) for k in range(4)] + [generate_scene(7200, 600, 400)]
    items = [EngineInput(s.color, s.depth, cfg.score_threshold) for s in scenes]
    strict = dataclasses.replace(items[1], score_threshold=0.9)  # keeps fewer than the graph's threshold
    cases = [("1 image", items[:1]), ("3 images in a bucket of 4", items[1:4]), ("mixed sizes", [items[0], items[4]]),
             ("the largest bucket", items[:4]), ("a stricter image beside others", [items[0], strict, items[2]])]
    took: list[bool] = []
    _count_graph_strings(graphed, took)
    over: list[bool] = []
    _count_graph_strings(small, over)
    mixed: list[bool] = []
    _count_graph_strings(upto2, mixed)
    with caplog.at_level(logging.WARNING):
        for what, batch in cases:
            want = plain.infer(batch)
            assert sum(len(d.scores) for d in want) > 0, what
            _same(want, graphed.infer(batch), what)
            _same(want, small.infer(batch), f"{what}, over the capacity")
            _same(want, upto2.infer(batch), f"{what}, graph masks up to bucket 2")
            # The pipelined worker's way: the next batch started before this one is finished.
            first, second = graphed.start(batch), graphed.start(items[:1])
            _same(want, first(), f"{what}, started before the next")
            _same(plain.infer(items[:1]), second(), f"{what}, the next")
    assert took and all(took), "every batch took its strings from the graph"
    assert not any(over) and small.masks_over_capacity == len(over)
    assert graphed.masks_over_capacity == 0
    # Batches of 3 and 4 images run in the bucket of 4: their masks pasted after its graph, the others' in theirs.
    assert mixed == [len(batch) <= 2 for _, batch in cases] and upto2.masks_over_capacity == 0
    assert any("raise ENGINE_OPTIONS mask_changes" in r.getMessage() for r in caplog.records)


@pytest.mark.gpu
def test_graph_masks_follow_detectron2s_paste(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A detectron2 RGB-D model pastes by detectron2's rule (its region around the box, grid_sample):
    the graph's strings are the ones pasted after the graph."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from dd.config import load_model_config
    from tests.conftest import scene
    from tests.d2_folders import write_d2_folder

    cfg = load_model_config(write_d2_folder(tmp_path / "d2-rgbd", kind="rgbd"))
    engines = _engines(cfg, {"warmup_sizes": [[233, 347]], "max_canvases_at_load": True},
                       {"plain": {"graph_masks": False}, "graph": {}}, request)
    plain, graphed = engines["plain"], engines["graph"]
    assert graphed.semantics.paste == "detectron2"
    took: list[bool] = []
    _count_graph_strings(graphed, took)
    pairs = [scene(k, 233, 347) for k in range(3)]
    for n in (1, 3):
        batch = [EngineInput(c, d, 0.0) for c, d in pairs[:n]]
        want = plain.infer(batch)
        assert sum(len(d.scores) for d in want) > 0
        _same(want, graphed.infer(batch), f"{n} image(s)")
    assert took == [True, True]
