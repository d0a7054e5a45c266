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
