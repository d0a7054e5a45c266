"""The fast engine's load-time run at an "odd" input size (fast/odd_size.py): the size's padded feature maps
divide differently from the first warm-up size's, and the engine prepares an input onto its canvas and runs a
paste and RLE encoding at that size at load, so that nothing keyed on how a size divides is left to the first
request."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from dd.config import load_model_config
from dd.models.model_folder import random_model_folder
from dd.models.semantics import DETECTRON2, TORCHVISION
from dd.worker.engines.base import EngineInput
from dd.worker.engines.fast import engine as fast_engine
from dd.worker.engines.fast.engine import FastMaskRCNN
from dd.worker.engines.fast.odd_size import odd_warmup_size


def blocks(size: tuple[int, int]) -> tuple[int, ...]:
    return tuple(math.ceil(n / 32) for n in size)


@pytest.mark.parametrize("semantics", [TORCHVISION, DETECTRON2], ids=["torchvision", "detectron2"])
@pytest.mark.parametrize("first", [(720, 1280), (480, 640), (800, 800), (1080, 1920), (600, 1000)])
def test_the_odd_size_pads_to_the_other_parity_where_the_resize_allows(semantics, first) -> None:
    def resized(h: int, w: int) -> tuple[int, int]:
        return semantics.resized_size(h, w, 800, 1333)

    h, w = odd_warmup_size([list(first)], resized)
    got, base = blocks(resized(h, w)), blocks(resized(*first))
    # Both padded sides flip parity: the largest level (stride 4, 8 * blocks wide) then divides by 16
    # where the warm-up's does not, or the other way round, in both dimensions.
    assert [g % 2 != b % 2 for g, b in zip(got, base)] == [True, True], (first, (h, w), got, base)


def test_the_odd_size_never_repeats_a_warm_up_size_padding() -> None:
    def resized(h: int, w: int) -> tuple[int, int]:
        return TORCHVISION.resized_size(h, w, 800, 1333)

    sizes = [[720, 1280], [799, 1294], [480, 640]]
    h, w = odd_warmup_size(sizes, resized)
    assert blocks(resized(h, w)) not in {blocks(resized(*s)) for s in sizes}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_model_folder(tmp_path_factory.mktemp("odd") / "rgb", input_kind="rgb", seed=3, min_size=96,
                               max_size=160)


def _engine(folder: Path, **options: object) -> FastMaskRCNN:
    cfg = load_model_config(folder)
    engine = FastMaskRCNN(dataclasses.replace(cfg, engine_options={"allow_cpu": True, **options}), "cpu")
    engine.load()
    return engine


def test_load_pastes_masks_at_the_odd_size_when_asked(model: Path, caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The network sees only canvases (all captured at load or right after), so the odd size's run is its
    input preparation onto a canvas and a mask paste and RLE encoding at the odd size itself."""
    pasted: list[tuple[int, int]] = []
    paste = fast_engine.paste_and_encode

    def spy(probs, boxes, h, w, *args, **kwargs):
        pasted.append((h, w))
        return paste(probs, boxes, h, w, *args, **kwargs)

    monkeypatch.setattr(fast_engine, "paste_and_encode", spy)
    with caplog.at_level(logging.INFO, logger="dd.worker.engines.fast.engine"):
        engine = _engine(model, warmup_sizes=[[72, 120]], warmup_odd_size=True)
    cfg = engine.config
    h, w = odd_warmup_size([[72, 120]], lambda a, b: engine.semantics.resized_size(a, b, cfg.min_size, cfg.max_size))
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"pasted masks at {w}x{h}" in m for m in messages), messages
    assert (h, w) in pasted
    # The network ran on the warm-up size's canvas only (anchors are cached by canvas).
    assert len(engine._anchors) == 1
    # And the engine serves both sizes.
    rng = np.random.default_rng(0)
    for size in ((72, 120), (h, w)):
        (det,) = engine.infer([EngineInput(rng.integers(0, 255, (*size, 3), np.uint8), None, 0.0)])
        assert det.boxes.shape[1] == 4


def test_the_odd_size_run_is_off_on_the_cpu_by_default(model: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="dd.worker.engines.fast.engine"):
        engine = _engine(model, warmup_sizes=[[72, 120]])
    assert not any("pasted masks at" in r.getMessage() for r in caplog.records)
    assert len(engine._anchors) == 1
