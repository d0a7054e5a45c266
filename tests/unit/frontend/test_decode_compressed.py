"""dd.frontend.decode with jpeg_to_worker: which color images go into the slot compressed, and how."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from dd.frontend.decode import decode_into_slot
from dd.frontend.errors import ServeError, Status
from dd.frontend.inputs import ImageInput
from tests.jpeg_samples import jpeg, photo

SLOT = 1 << 20


def _png(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def _decode(color: bytes, depth: bytes | None = None, *, max_pixels: int = 1 << 20, to_worker: bool = True):
    slot = memoryview(bytearray(SLOT))
    depth_input = None if depth is None else ImageInput(depth)
    return decode_into_slot(ImageInput(color), depth_input, depth is not None, slot, max_pixels,
                            jpeg_to_worker=to_worker), slot


def test_a_jpeg_goes_into_the_slot_compressed_and_depth_after_its_pixels() -> None:
    rgb = photo(1)
    data = jpeg(rgb)
    depth = np.arange(120 * 160, dtype=np.uint16).reshape(120, 160)
    decoded, slot = _decode(data, _png(depth))
    c = decoded.color
    assert (c.offset, c.shape, c.dtype, c.encoding, c.nbytes) == (0, (120, 160, 3), "uint8", "jpeg", len(data))
    assert bytes(slot[:len(data)]) == data
    # The slot's layout does not change: depth lies where it would after the decoded pixels.
    assert decoded.depth is not None and decoded.depth.offset >= 120 * 160 * 3
    placed = np.frombuffer(slot, np.uint16, 120 * 160, decoded.depth.offset).reshape(120, 160)
    assert np.array_equal(placed, depth)


def test_the_same_jpeg_is_decoded_when_the_policy_says_frontend() -> None:
    rgb = photo(2)
    data = jpeg(rgb)
    decoded, slot = _decode(data, to_worker=False)
    assert decoded.color.encoding == "" and decoded.color.nbytes == 0
    pixels = np.frombuffer(slot, np.uint8, 120 * 160 * 3).reshape(120, 160, 3)
    expected = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert np.array_equal(pixels, expected)


def test_a_png_color_is_never_sent_encoded() -> None:
    rgb = photo(3)
    decoded, slot = _decode(_png(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)))
    assert decoded.color.encoding == ""
    assert np.array_equal(np.frombuffer(slot, np.uint8, rgb.size).reshape(rgb.shape), rgb)


@pytest.mark.parametrize("kind", ["progressive", "grayscale"])
def test_jpegs_the_worker_may_read_otherwise_are_decoded_here(kind: str) -> None:
    data = jpeg(photo(4), progressive=True) if kind == "progressive" else jpeg(photo(4), mode="L")
    decoded, _ = _decode(data)
    assert decoded.color.encoding == ""


def test_a_jpeg_bigger_than_its_pixels_is_decoded_here() -> None:
    """8 x 8 pixels (192 bytes) with a 2 KB comment: its pixels take less of the slot than its bytes."""
    small = jpeg(photo(5)[:8, :8].copy(), comment=b"x" * 2000)
    assert len(small) > 8 * 8 * 3
    decoded, _ = _decode(small)
    assert decoded.color.encoding == "" and decoded.color.shape == (8, 8, 3)


def test_compressed_jpegs_are_checked_as_before() -> None:
    data = jpeg(photo(6))
    with pytest.raises(ServeError) as err:
        _decode(data, max_pixels=100 * 100)
    assert err.value.status == Status.INVALID_ARGUMENT and "max_image_pixels" in err.value.message
    with pytest.raises(ServeError) as err:
        _decode(data[:-100])
    assert err.value.status == Status.INVALID_ARGUMENT and "truncated" in err.value.message
