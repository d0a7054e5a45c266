"""JPEGs the frontend sent compressed: decoded by the worker's core (engines that do not decode them) or by
the engine (dd.worker.engines.jpeg_decode), with the frontend's pixels on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dd.config import load_model_config
from dd.frontend.decode import decode_into_slot
from dd.frontend.inputs import ImageInput
from dd.proto.deep_detection.v1 import detector_pb2 as pb
from dd.worker.core import WorkerCore, WorkItem
from dd.worker.engines import load_engine
from dd.worker.engines.base import EncodedImage, EngineInput, InputError
from dd.worker.engines.jpeg_decode import decode_cpu, decode_to_device
from dd.worker.engines.null import NullEngine
from tests.jpeg_samples import exif_rotated, jpeg, photo


def _frontend_pixels(data: bytes) -> np.ndarray:
    """What the frontend writes into the slot for this JPEG when it decodes it itself."""
    slot = memoryview(bytearray(8 << 20))  # up to 1920x1080 (the H200 run failed on 1 MiB for 1280x720)
    got = decode_into_slot(ImageInput(data), None, False, slot, 4 << 20)
    return np.frombuffer(slot, np.uint8, int(np.prod(got.color.shape))).reshape(got.color.shape).copy()


def _encoded(data: bytes, h: int = 120, w: int = 160) -> EncodedImage:
    return EncodedImage(np.frombuffer(data, np.uint8), h, w)


SAMPLES = {"420": lambda: jpeg(photo(1)), "444": lambda: jpeg(photo(2), subsampling=0, quality=97),
           "exif-rotated": lambda: exif_rotated(photo(3))}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_the_cpu_decoder_gives_the_frontends_pixels(name: str) -> None:
    data = SAMPLES[name]()
    expected = _frontend_pixels(data)
    assert expected.shape == (120, 160, 3)  # EXIF orientation ignored: as stored, what depth is registered to
    assert np.array_equal(decode_cpu(_encoded(data)), expected)
    on_cpu = decode_to_device([_encoded(data), _encoded(data)], torch.device("cpu"))
    assert all(np.array_equal(t.numpy(), expected) for t in on_cpu)


def test_bad_data_is_the_requests_fault() -> None:
    data = jpeg(photo(4))
    with pytest.raises(InputError, match="could not be decoded"):
        decode_cpu(_encoded(data[:2] + b"\x00" * 50))
    with pytest.raises(InputError, match="differs from its header"):
        decode_cpu(_encoded(data, 100, 160))


def _core(tmp_path: Path, engine: str = "RGBNullServicer") -> WorkerCore:
    (tmp_path / "categories.txt").write_text("a\nb\n")
    (tmp_path / "node_config.json").write_text(json.dumps({
        "DETECTION_TYPE": engine, "CATEGORY_FILE": "categories.txt", "SCORE_THRESH_TEST": 0.0,
        "ENGINE_OPTIONS": {"instances": 9}}))
    cfg = load_model_config(tmp_path)
    return WorkerCore(cfg, load_engine(cfg, "cpu"), "m.0")


def _bodies_without_timing(outcomes) -> list[bytes]:
    out = []
    for o in outcomes:
        assert o.code == "OK", o.message
        resp = pb.DetectResponse.FromString(o.body)
        resp.ClearField("timing")
        out.append(resp.SerializeToString())
    return out


def test_the_core_decodes_for_an_engine_that_does_not(tmp_path: Path) -> None:
    core = _core(tmp_path)
    assert not core.engine.decodes_jpeg
    datas = [SAMPLES[k]() for k in sorted(SAMPLES)]
    compressed = core.run([WorkItem(_encoded(d), None) for d in datas])
    decoded = core.run([WorkItem(_frontend_pixels(d), None) for d in datas])
    assert _bodies_without_timing(compressed) == _bodies_without_timing(decoded)
    assert all(o.timings.decode_us > 0 for o in compressed)  # the worker's decode is counted


def test_a_jpeg_that_does_not_decode_fails_alone(tmp_path: Path) -> None:
    core = _core(tmp_path)
    good = jpeg(photo(5))
    out = core.run([WorkItem(_encoded(good[:2] + b"\x00" * 50), None), WorkItem(_encoded(good), None)])
    assert out[0].code == "INVALID_ARGUMENT" and "could not be decoded" in out[0].message
    assert out[1].code == "OK" and out[1].timings.batch_size == 1


class _Decoding(NullEngine):
    """Decodes JPEGs itself, and remembers what it was given."""

    decodes_jpeg = True
    seen: list[type] = []

    def infer(self, batch: list[EngineInput], want_masks: bool = True):
        type(self).seen += [type(x.color) for x in batch]
        for x in batch:
            if isinstance(x.color, EncodedImage):
                x.color = decode_cpu(x.color)
        return super().infer(batch, want_masks)


def test_an_engine_that_decodes_gets_the_bytes(tmp_path: Path) -> None:
    core = _core(tmp_path)
    core.engine = _Decoding(core.model, "cpu")
    core.engine.load()
    assert not core.engine.decodes_jpeg_on_gpu()  # on the CPU "auto" keeps decoding in the frontend
    data = jpeg(photo(6))
    out = core.run([WorkItem(_encoded(data), None), WorkItem(_frontend_pixels(data), None)])
    assert _Decoding.seen == [EncodedImage, np.ndarray]
    assert _bodies_without_timing(out[:1]) == _bodies_without_timing(out[1:])


def test_an_engine_input_error_is_invalid_argument(tmp_path: Path) -> None:
    core = _core(tmp_path)
    core.engine = _Decoding(core.model, "cpu")
    core.engine.load()
    good = jpeg(photo(7))
    out = core.run([WorkItem(_encoded(good), None), WorkItem(_encoded(good, 10, 10), None)])
    assert out[0].code == "OK"
    assert out[1].code == "INVALID_ARGUMENT" and "differs from its header" in out[1].message


@pytest.mark.gpu
def test_nvjpeg_is_within_a_few_levels_of_the_cpu_decoder() -> None:
    """nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: a few levels apart on average (torchvision's
    own test allows a mean below 2), and without chroma subsampling (4:4:4) a few levels at most."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from dd.synth.scenes import generate_scene

    kinds = [(90, 2), (75, 2), (95, 0), (85, 1), (60, 2)]  # (quality, subsampling: 0 4:4:4, 1 4:2:2, 2 4:2:0)
    images = [jpeg(generate_scene(30_000 + k, 1280, 720).color, quality=q, subsampling=s)
              for k, (q, s) in enumerate(kinds)] + [exif_rotated(photo(8))]
    encoded = [_encoded(d, *_frontend_pixels(d).shape[:2]) for d in images]
    gpu = decode_to_device(encoded, torch.device("cuda"))
    for k, (d, t) in enumerate(zip(images, gpu)):
        ref = _frontend_pixels(d).astype(np.int16)
        assert t.is_cuda and tuple(t.shape) == ref.shape
        diff = np.abs(t.cpu().numpy().astype(np.int16) - ref)
        print(f"image {k} {kinds[k] if k < len(kinds) else 'exif'}: mean {diff.mean():.3f} "
              f"p99 {np.percentile(diff, 99):.0f} max {diff.max()}")
        assert diff.mean() < 2.0
        if k < len(kinds) and kinds[k][1] == 0:
            assert diff.max() <= 8


@pytest.mark.gpu
def test_an_image_nvjpeg_refuses_goes_to_the_cpu_decoder() -> None:
    """A batch with a broken JPEG: nvJPEG refuses the batch, then that image; the CPU decoder decides (here:
    InputError, the request's fault), and a good image alone still decodes on the GPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    good = jpeg(photo(9))
    with pytest.raises(InputError):
        decode_to_device([_encoded(good), _encoded(good[:2] + b"\x00" * 50)], torch.device("cuda"))
    (t,) = decode_to_device([_encoded(good)], torch.device("cuda"))
    assert t.is_cuda and tuple(t.shape) == (120, 160, 3)
