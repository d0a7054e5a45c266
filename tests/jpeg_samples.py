"""JPEGs of the kinds decoders disagree on, made in memory for the JPEG-in-the-worker tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image as PILImage

from tests.conftest import scene


def photo(seed: int = 0, h: int = 120, w: int = 160) -> np.ndarray:
    """RGB pixels with edges and noise, so that decoders' rounding shows."""
    return scene(seed, h, w)[0]


def jpeg(rgb: np.ndarray, mode: str = "RGB", **save: object) -> bytes:
    """`rgb` as a JPEG through Pillow (libjpeg): mode "L" grayscale, "CMYK"; save: quality, progressive,
    subsampling, exif."""
    buf = io.BytesIO()
    PILImage.fromarray(rgb).convert(mode).save(buf, "JPEG", quality=save.pop("quality", 90), **save)
    return buf.getvalue()


def exif_rotated(rgb: np.ndarray, orientation: int = 6) -> bytes:
    """A JPEG whose EXIF says "rotate by 90 degrees to view" (orientation 6): decoders that apply it give a
    W x H image; the server uses pixels as stored (H x W), as its depth is registered to them."""
    exif = PILImage.Exif()
    exif[0x0112] = orientation
    return jpeg(rgb, exif=exif.tobytes())


def with_sof(data: bytes, marker: int | None = None, precision: int | None = None) -> bytes:
    """The JPEG with its frame header's marker or sample precision changed (a 12-bit or arithmetic-coded
    header; Pillow writes neither). Only the header: its scans no longer match it."""
    out = bytearray(data)
    i = next(k for k in range(2, len(out) - 1) if out[k] == 0xFF and out[k + 1] in (0xC0, 0xC1, 0xC2))
    if marker is not None:
        out[i + 1] = marker
    if precision is not None:
        out[i + 4] = precision
    return bytes(out)


def with_app14_adobe(data: bytes, transform: int) -> bytes:
    """The JPEG without its JFIF segment and with an Adobe APP14 segment saying `transform` (0: RGB)."""
    assert data[2:4] == b"\xff\xe0"
    rest = data[4 + int.from_bytes(data[4:6], "big"):]
    body = b"Adobe" + b"\x00\x64" + b"\x00\x00" + b"\x00\x00" + bytes([transform])
    return data[:2] + b"\xff\xee" + (len(body) + 2).to_bytes(2, "big") + body + rest
