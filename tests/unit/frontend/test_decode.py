"""dd.frontend.decode on protocol-free ImageInputs (no proto): each encoding, and the refusals that name what
was sent. The full catalogue of bad images, through a real server, is tests/integration/test_bad_input.py."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from dd.frontend.decode import decode_into_slot
from dd.frontend.errors import ServeError, Status
from dd.frontend.inputs import ImageInput

SLOT = 1 << 16


def decode(color: ImageInput, depth: ImageInput | None = None, needs_depth: bool = False):
    slot = memoryview(bytearray(SLOT))
    return decode_into_slot(color, depth, needs_depth, slot, 1 << 16), slot


def test_encoded_and_raw_color_land_in_the_slot_as_rgb() -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), np.uint8)
    for image in (ImageInput(cv2.imencode(".png", rgb[..., ::-1])[1].tobytes()),
                  ImageInput(rgb.tobytes(), "raw", (20, 30, 3), "uint8")):
        out, slot = decode(image)
        assert (out.height, out.width, out.depth) == (20, 30, None)
        assert np.array_equal(np.ndarray((20, 30, 3), np.uint8, buffer=slot, offset=out.color.offset), rgb)


def test_raw_float_depth_follows_color_in_the_slot() -> None:
    depth = np.full((20, 30), 1.25, np.float32)
    out, slot = decode(ImageInput(bytes(20 * 30 * 3), "raw", (20, 30, 3), "uint8"),
                       ImageInput(depth.tobytes(), "raw", (20, 30, 1), "float32"), needs_depth=True)
    assert out.depth is not None and out.depth.dtype == "float32" and out.depth.offset >= 20 * 30 * 3
    assert np.array_equal(np.ndarray((20, 30), np.float32, buffer=slot, offset=out.depth.offset), depth)


def test_no_depth_given_is_empty_depth() -> None:
    color = ImageInput(bytes(20 * 30 * 3), "raw", (20, 30, 3), "uint8")
    assert decode(color, None)[0].depth is None
    with pytest.raises(ServeError, match="needs depth"):
        decode(color, None, needs_depth=True)


@pytest.mark.parametrize("image, words", [
    (ImageInput(b"x", "zstd", (2, 2, 3), "uint8"), "color: ZSTD data is not a Zstandard frame"),
    (ImageInput(b"x", "5"), "color: unknown encoding 5; use ENCODED (0), RAW (1) or ZSTD (2)"),
    (ImageInput(bytes(6), "raw", (1, 2, 3), "dtype_unspecified"), "got DTYPE_UNSPECIFIED"),
    (ImageInput(bytes(5), "raw", (2, 2, 3), "uint8"), "RAW data has 5 bytes but shape [2, 2, 3]"),
    (ImageInput(b""), "color.data is empty"),
])
def test_refusals_name_what_was_sent(image: ImageInput, words: str) -> None:
    with pytest.raises(ServeError) as err:
        decode(image)
    assert err.value.status == Status.INVALID_ARGUMENT and words in err.value.message


def _rst_jpeg(h: int, w: int, seed: int = 0) -> tuple[bytes, np.ndarray]:
    from tests.conftest import scene

    color, _ = scene(seed, h=h, w=w)
    ok, buf = cv2.imencode(".jpg", color[..., ::-1], [cv2.IMWRITE_JPEG_RST_INTERVAL, -(-w // 16)])
    assert ok
    whole = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION), cv2.COLOR_BGR2RGB)
    return buf.tobytes(), whole


def _color_of(data: bytes, h: int, w: int) -> np.ndarray:
    """The color image an RGB request with this file puts into a slot."""
    slot = memoryview(bytearray(h * w * 3))
    out = decode_into_slot(ImageInput(data), None, False, slot, 1 << 20)
    return np.ndarray((h, w, 3), np.uint8, buffer=slot, offset=out.color.offset)


def test_a_jpeg_with_restart_markers_is_decoded_in_strips_to_the_same_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    from dd.frontend import decode as dec

    data, want = _rst_jpeg(480, 640)
    split = []
    real = dec.decode_in_strips
    monkeypatch.setattr(dec, "STRIPS", 4)
    monkeypatch.setattr(dec, "decode_in_strips", lambda *a: split.append(a[3]) or real(*a))
    assert np.array_equal(_color_of(data, 480, 640), want)
    assert split == [4], "decoded whole"


def test_a_color_decode_beside_another_one_is_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """A busy frontend's cores are taken by its other requests: strips would only add hand-offs."""
    from dd.frontend import decode as dec

    data, want = _rst_jpeg(480, 640)
    monkeypatch.setattr(dec, "STRIPS", 4)
    monkeypatch.setattr(dec._COLOR, "count", 1)  # another request's color decode is running
    monkeypatch.setattr(dec, "restart_layout", lambda data: pytest.fail("looked for strips"))
    assert np.array_equal(_color_of(data, 480, 640), want)
    assert dec._COLOR.count == 1


def test_a_jpeg_whose_strips_fail_is_decoded_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    from dd.frontend import decode as dec

    data, want = _rst_jpeg(480, 640)
    monkeypatch.setattr(dec, "STRIPS", 4)
    monkeypatch.setattr(dec, "decode_in_strips", lambda *a: False)
    assert np.array_equal(_color_of(data, 480, 640), want)
    assert dec._COLOR.count == 0


def test_beside_a_depth_decode_the_color_takes_fewer_strips(monkeypatch: pytest.MonkeyPatch) -> None:
    """Half the cores for each image: on a 2-core machine (STRIPS_BESIDE_DEPTH 1) the color is whole."""
    from dd.frontend import decode as dec

    data, want = _rst_jpeg(480, 640)
    depth = cv2.imencode(".png", np.full((480, 640), 1200, np.uint16))[1].tobytes()
    for beside, expect in ((2, [2]), (1, [])):
        split = []
        real = dec.decode_in_strips
        monkeypatch.setattr(dec, "STRIPS", 4)
        monkeypatch.setattr(dec, "STRIPS_BESIDE_DEPTH", beside)
        monkeypatch.setattr(dec, "decode_in_strips", lambda *a: split.append(a[3]) or real(*a))
        slot = memoryview(bytearray(480 * 640 * 5 + 4096))
        out = decode_into_slot(ImageInput(data), ImageInput(depth), True, slot, 1 << 20)
        assert split == expect
        assert np.array_equal(np.ndarray((480, 640, 3), np.uint8, buffer=slot, offset=out.color.offset), want)


def test_a_depth_png_is_inflated_in_parts_only_when_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from dd.client.encoding import encode_png16
    from dd.frontend import decode as dec
    from dd.png_rows import unfilter
    from tests.conftest import scene

    color, depth = scene(4, h=480, w=640)
    png = encode_png16(depth)
    jpg = cv2.imencode(".png", color[..., ::-1])[1].tobytes()
    real = dec.inflate_parts_into
    for busy, expect in ((0, [3]), (1, [])):
        split = []
        monkeypatch.setattr(dec, "STRIPS_BESIDE_DEPTH", 3)
        monkeypatch.setattr(dec._DEPTH, "count", busy)  # another request's depth decode is running, or none
        monkeypatch.setattr(dec, "inflate_parts_into", lambda *a: split.append(a[2]) or real(*a))
        slot = memoryview(bytearray(480 * 640 * 5 + 4096))
        out = decode_into_slot(ImageInput(jpg), ImageInput(png), True, slot, 1 << 20, png_rows_to_worker=True)
        assert split == expect and dec._DEPTH.count == busy
        d = out.depth
        rows = np.frombuffer(slot, np.uint8, d.nbytes, d.offset).reshape(480, 1 + 2 * 640)
        assert np.array_equal(unfilter(rows, 480, 640), depth)
