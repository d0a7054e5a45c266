"""16-bit PNG depth rows reconstructed to pixels: the torch function engines run on their device
(dd.worker.engines.png_unfilter, here on CPU tensors) and the worker core's numpy fallback (dd.png_rows),
both against OpenCV's decoder of the same file, written with an explicit filter per row (tests/png_writer)."""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dd.config import load_model_config
from dd.proto.deep_detection.v1 import detector_pb2 as pb
from dd.png_rows import PngRows, RowsError, unfilter
from dd.synth.scenes import generate_scene
from dd.worker.core import WorkerCore, WorkItem
from dd.worker.engines import load_engine
from dd.worker.engines.base import EngineInput
from dd.worker.engines.null import NullEngine
from dd.worker.engines.png_unfilter import depth_dtype, depth_to_device, depths_into, host_array, unfilter_rows
from tests.png_writer import AVERAGE, NONE, PAETH, SUB, UP, filtered_rows, png16, random_filters


def _reference(png: bytes, shape: tuple[int, int]) -> np.ndarray:
    out = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert out is not None and out.dtype == np.uint16
    return out.reshape(shape)


def _rows(depth: np.ndarray, filters) -> np.ndarray:
    h, w = depth.shape
    return np.frombuffer(filtered_rows(depth, filters), np.uint8).reshape(h, 1 + 2 * w).copy()


def _frames(rng: np.random.Generator):
    """(name, depth) pairs: noise, smooth ramps that wrap, synthetic scenes, constant, and odd sizes."""
    for k in range(8):
        h, w = (int(s) for s in rng.integers(1, 50, 2))
        yield f"noise{k}", rng.integers(0, 65536, (h, w)).astype(np.uint16)
        steps = rng.integers(-300, 300, (h, w))
        yield f"walk{k}", (np.cumsum(np.cumsum(steps, 0), 1) % 65536).astype(np.uint16)
    yield "const", np.full((7, 13), 65535, np.uint16)
    yield "one-pixel", np.array([[513]], np.uint16)
    for seed in (1, 2):
        yield f"scene{seed}", generate_scene(seed, 97, 75).depth


@pytest.mark.parametrize("mix", ["sub", "up", "none", "mixed"])
def test_torch_and_numpy_reconstruct_what_opencv_decodes(mix: str) -> None:
    rng = np.random.default_rng({"sub": 1, "up": 2, "none": 3, "mixed": 4}[mix])
    for name, depth in _frames(rng):
        h, w = depth.shape
        if mix == "mixed":
            filters = random_filters(rng, h)
        else:
            filters = np.full(h, {"sub": SUB, "up": UP, "none": NONE}[mix])
        expected = _reference(png16(depth, filters), (h, w))
        assert np.array_equal(expected, depth), name  # the writer is right, by OpenCV's decoder
        rows = _rows(depth, filters)
        got = unfilter_rows(torch.from_numpy(rows), w)
        assert got.dtype == torch.uint16 and np.array_equal(got.numpy(), expected), name
        assert np.array_equal(unfilter(rows, h, w), expected), name


def test_a_full_size_synthetic_depth_frame() -> None:
    depth = generate_scene(5000, 1280, 720).depth
    rng = np.random.default_rng(5)
    for filters in (np.full(720, SUB), random_filters(rng, 720)):
        rows = _rows(depth, filters)
        expected = _reference(png16(depth, filters), depth.shape)
        assert np.array_equal(unfilter_rows(torch.from_numpy(rows), 1280).numpy(), expected)
        assert np.array_equal(unfilter(rows, 720, 1280), expected)


def test_opencv_s_own_encodings_reconstruct() -> None:
    """Rows as OpenCV writes them (libpng's choice of filters), inflated with zlib."""
    depth = generate_scene(7, 160, 120).depth
    for level in (1, 3, 9):
        ok, buf = cv2.imencode(".png", depth, [cv2.IMWRITE_PNG_COMPRESSION, level])
        assert ok
        data = buf.tobytes()
        stream, pos = b"", 8
        while pos < len(data):
            n = int.from_bytes(data[pos:pos + 4], "big")
            if data[pos + 4:pos + 8] == b"IDAT":
                stream += data[pos + 8:pos + 8 + n]
            pos += 12 + n
        rows = np.frombuffer(zlib.decompress(stream), np.uint8).reshape(120, 321)
        if set(rows[:, 0].tolist()) <= {NONE, SUB, UP}:
            assert np.array_equal(unfilter(rows, 120, 160), depth)
            assert np.array_equal(unfilter_rows(torch.from_numpy(rows.copy()), 160).numpy(), depth)


def test_a_batch_of_images_in_one_call() -> None:
    rng = np.random.default_rng(6)
    depths = [generate_scene(20 + k, 33, 21).depth for k in range(3)]
    rows = np.stack([_rows(d, random_filters(rng, 21)) for d in depths])
    got = unfilter_rows(torch.from_numpy(rows), 33)
    assert got.shape == (3, 21, 33) and np.array_equal(got.numpy(), np.stack(depths))


def test_a_batch_of_inputs_into_a_static_tensor() -> None:
    """As the fast engine writes a batch into its graph's input: rows and arrays mixed, or rows only."""
    rng = np.random.default_rng(7)
    depths = [generate_scene(30 + k, 24, 18).depth for k in range(4)]
    as_rows = [PngRows(_rows(d, random_filters(rng, 18)), 18, 24) for d in depths]
    for batch in ([as_rows[0], depths[1], as_rows[2]], as_rows[:3], [depths[0], as_rows[1], as_rows[2]]):
        out = torch.zeros(4, 18, 24, dtype=torch.uint16)
        depths_into(batch, out)
        assert np.array_equal(out[:3].numpy(), np.stack(depths[:3])) and not out[3].any()


def test_numpy_refuses_average_paeth_and_wrong_sizes() -> None:
    depth = np.arange(12, dtype=np.uint16).reshape(3, 4)
    for kind in (AVERAGE, PAETH):
        with pytest.raises(RowsError, match=f"row 1 has PNG filter type {kind}"):
            unfilter(_rows(depth, [SUB, kind, UP]), 3, 4)
    with pytest.raises(RowsError, match="must be 3 x 9 bytes"):
        unfilter(np.zeros((3, 8), np.uint8), 3, 4)
    with pytest.raises(ValueError, match="rows must be"):
        unfilter_rows(torch.zeros(3, 8, dtype=torch.uint8), 4)


def test_into_an_existing_tensor_and_the_engine_helpers() -> None:
    depth = generate_scene(3, 40, 30).depth
    rows = PngRows(_rows(depth, random_filters(np.random.default_rng(0), 30)), 30, 40)
    out = torch.zeros(2, 30, 40, dtype=torch.uint16)
    depth_to_device(rows, torch.device("cpu"), out[1])
    assert np.array_equal(out[1].numpy(), depth) and not out[0].any()
    assert depth_dtype(rows) == torch.uint16 and depth_dtype(depth) == torch.uint16
    assert depth_dtype(depth.astype(np.float32)) == torch.float32
    assert host_array(rows) is rows.data and host_array(depth) is depth
    assert np.array_equal(depth_to_device(depth, torch.device("cpu")).numpy(), depth)
    assert rows.dtype == np.dtype(np.uint16) and rows.shape == (30, 40)


# -- the worker's core: rows reconstructed for an engine that does not do it itself --------------------

class _Recording(NullEngine):
    """The null engine, recording the depth type each image reached it with."""

    seen: list[str] = []

    def infer(self, batch: list[EngineInput], want_masks: bool = True):
        for x in batch:
            type(self).seen.append("rows" if isinstance(x.depth, PngRows) else "pixels")
            if isinstance(x.depth, PngRows):
                x.depth = unfilter_rows(torch.from_numpy(x.depth.data), x.depth.width).numpy()
        return super().infer(batch, want_masks)


class _Unfilters(_Recording):
    unfilters_png_rows = True


def _core(tmp_path: Path, engine_cls: type[NullEngine] | None = None) -> WorkerCore:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "categories.txt").write_text("a\nb\n")
    (tmp_path / "node_config.json").write_text(json.dumps({
        "DETECTION_TYPE": "RGBDNullServicer", "CATEGORY_FILE": "categories.txt", "SCORE_THRESH_TEST": 0.0,
        "ENGINE_OPTIONS": {"instances": 6}}))
    cfg = load_model_config(tmp_path)
    engine = load_engine(cfg, "cpu") if engine_cls is None else engine_cls(cfg, "cpu")
    engine.load()
    return WorkerCore(cfg, engine, "t.0")


def _answer(body: bytes) -> bytes:
    resp = pb.DetectResponse.FromString(body)
    resp.ClearField("timing")  # the only part that may differ: how long things took
    return resp.SerializeToString()


def test_the_core_reconstructs_rows_for_an_engine_that_does_not(tmp_path: Path) -> None:
    _Recording.seen = []
    color = np.full((30, 40, 3), 90, np.uint8)
    depth = generate_scene(11, 40, 30).depth
    rows = _rows(depth, random_filters(np.random.default_rng(1), 30))
    pixels_core = _core(tmp_path / "m", _Recording)
    rows_core = _core(tmp_path / "m", _Unfilters)
    plain = pixels_core.run([WorkItem(color, depth.copy())])[0]
    via_core = pixels_core.run([WorkItem(color, PngRows(rows, 30, 40))])[0]
    via_engine = rows_core.run([WorkItem(color, PngRows(rows, 30, 40))])[0]
    assert _Recording.seen == ["pixels", "pixels", "rows"]
    assert plain.code == via_core.code == via_engine.code == "OK"
    assert _answer(plain.body) == _answer(via_core.body) == _answer(via_engine.body)
    assert via_core.timings.decode_us > 0  # the core's reconstruction counts as decoding


def test_the_core_refuses_rows_it_cannot_reconstruct(tmp_path: Path) -> None:
    core = _core(tmp_path)
    color = np.zeros((4, 5, 3), np.uint8)
    depth = np.arange(20, dtype=np.uint16).reshape(4, 5)
    bad = PngRows(_rows(depth, [SUB, SUB, PAETH, UP]), 4, 5)
    good = PngRows(_rows(depth, [SUB, UP, NONE, UP]), 4, 5)
    out = core.run([WorkItem(color, bad), WorkItem(color, good)])
    assert out[0].code == "INVALID_ARGUMENT" and "filter type 4" in out[0].message
    assert out[1].code == "OK"


def test_the_null_engines_png_rows_option(tmp_path: Path) -> None:
    """Benchmarks (scripts/bench_frontend_cpu.py --png-rows): the null engine takes rows as a GPU engine would."""
    core = _core(tmp_path)
    assert not core.engine.unfilters_png_rows and not core.engine.unfilters_png_rows_on_gpu()
    cfg = dataclasses.replace(core.model, engine_options={**core.model.engine_options, "png_rows": True})
    engine = NullEngine(cfg, "cpu")
    engine.load()
    assert engine.unfilters_png_rows and engine.unfilters_png_rows_on_gpu()
    color = np.full((30, 40, 3), 90, np.uint8)
    depth = generate_scene(12, 40, 30).depth
    rows = PngRows(_rows(depth, random_filters(np.random.default_rng(2), 30)), 30, 40)
    got = WorkerCore(cfg, engine, "t.0").run([WorkItem(color, rows)])[0]
    assert _answer(got.body) == _answer(core.run([WorkItem(color, depth)])[0].body)
