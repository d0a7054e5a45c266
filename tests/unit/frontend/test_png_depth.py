"""dd.frontend.decode with png_rows_to_worker: which depth PNGs go into the slot as their inflated rows,
and how broken ones are refused (dd.frontend.png_depth)."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from dd.frontend.decode import decode_into_slot
from dd.frontend.errors import ServeError, Status
from dd.frontend.inputs import ImageInput
from dd.frontend.png_depth import inflate_into, parse
from dd.png_rows import unfilter
from dd.synth.scenes import generate_scene
from tests.png_writer import AVERAGE, NONE, PAETH, SUB, UP, chunk, filtered_rows, ihdr, png16, random_filters

SLOT = 1 << 20
H, W = 60, 80


def _decode(depth: bytes, *, to_worker: bool = True, slot_bytes: int = SLOT, h: int = H, w: int = W):
    slot = memoryview(bytearray(slot_bytes))
    ok, color = cv2.imencode(".png", np.full((h, w, 3), 120, np.uint8))
    decoded = decode_into_slot(ImageInput(color.tobytes()), ImageInput(depth), True, slot, 1 << 20,
                               png_rows_to_worker=to_worker)
    return decoded, slot


def _placed_pixels(decoded, slot) -> np.ndarray:
    d = decoded.depth
    assert d.encoding == "" and d.dtype == "uint16"
    return np.frombuffer(slot, np.uint16, d.shape[0] * d.shape[1], d.offset).reshape(d.shape)


def _depth(seed: int = 3, h: int = H, w: int = W) -> np.ndarray:
    return generate_scene(seed, w, h).depth


@pytest.mark.parametrize("filters", ["sub", "up", "none", "mixed"])
def test_none_sub_and_up_rows_go_as_rows(filters: str) -> None:
    depth = _depth()
    kinds = {"sub": [SUB] * H, "up": [UP] * H, "none": [NONE] * H,
             "mixed": random_filters(np.random.default_rng(0), H)}[filters]
    decoded, slot = _decode(png16(depth, kinds, idat_size=500))
    d = decoded.depth
    assert (d.shape, d.dtype, d.encoding, d.nbytes) == ((H, W), "uint16", "png_rows", H * (1 + 2 * W))
    assert d.offset >= H * W * 3
    rows = np.frombuffer(slot, np.uint8, d.nbytes, d.offset).reshape(H, 1 + 2 * W)
    assert rows.tobytes() == filtered_rows(depth, kinds)
    assert np.array_equal(unfilter(rows, H, W), depth)


def test_opencvs_default_encoding_goes_as_rows() -> None:
    """What a user's cv2.imwrite makes: every row Sub."""
    depth = _depth(5)
    ok, buf = cv2.imencode(".png", depth)
    decoded, slot = _decode(buf.tobytes())
    assert decoded.depth.encoding == "png_rows"
    rows = np.frombuffer(slot, np.uint8, decoded.depth.nbytes, decoded.depth.offset).reshape(H, 1 + 2 * W)
    assert np.array_equal(unfilter(rows, H, W), depth)


@pytest.mark.parametrize("other", [AVERAGE, PAETH])
def test_average_or_paeth_rows_make_it_go_as_pixels(other: int) -> None:
    depth = _depth(4)
    kinds = [SUB] * H
    kinds[H // 2] = other
    data = png16(depth, kinds)
    decoded, slot = _decode(data)
    assert np.array_equal(_placed_pixels(decoded, slot), depth)


def test_pixels_when_the_workers_do_not_reconstruct_rows() -> None:
    depth = _depth(6)
    decoded, slot = _decode(png16(depth, [SUB] * H), to_worker=False)
    assert np.array_equal(_placed_pixels(decoded, slot), depth)


def test_pixels_when_the_rows_do_not_fit_the_slot() -> None:
    """Rows are H bytes longer than pixels: a slot that holds exactly the pixels gets the pixels."""
    depth = _depth(7)
    need = H * W * 3 + H * W * 2  # color (64-byte aligned already: 14400) + depth pixels
    decoded, slot = _decode(png16(depth, [SUB] * H), slot_bytes=need)
    assert np.array_equal(_placed_pixels(decoded, slot), depth)


def test_other_pngs_go_the_opencv_way() -> None:
    depth = _depth(8)
    # tRNS (OpenCV may then return gray + alpha), and interlaced: parse() leaves them to OpenCV.
    trns = png16(depth, [SUB] * H, extra=[chunk(b"tRNS", struct.pack(">H", 0))])
    assert parse(trns) is None
    assert parse(png16(depth, [SUB] * H)) is not None
    data = bytearray(png16(depth, [SUB] * H))
    data[8:33] = ihdr(W, H, interlace=1)
    assert parse(bytes(data)) is None
    ok, eight = cv2.imencode(".png", (depth // 256).astype(np.uint8))
    assert parse(eight.tobytes()) is None
    ok, color = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))
    assert parse(color.tobytes()) is None
    # Ancillary chunks OpenCV's path drops are skipped here too: still rows.
    text = png16(depth, [SUB] * H, extra=[chunk(b"tEXt", b"k\x00v"), chunk(b"gAMA", struct.pack(">I", 45455))])
    decoded, _ = _decode(text)
    assert decoded.depth.encoding == "png_rows"
    # An 8-bit depth is refused as before, whatever the workers do.
    with pytest.raises(ServeError, match="single-channel 16-bit PNG"):
        _decode(eight.tobytes())


def _refused(data: bytes, match: str) -> None:
    with pytest.raises(ServeError, match=match) as err:
        _decode(data)
    assert err.value.status == Status.INVALID_ARGUMENT
    assert str(err.value).startswith("depth: ")


def test_broken_pngs_are_refused_with_what_is_wrong() -> None:
    depth = _depth(9)
    good = png16(depth, [SUB] * H, idat_size=1000)
    first_idat = good.index(b"IDAT")
    bad_crc = bytearray(good)
    bad_crc[first_idat + 10] ^= 0xFF
    _refused(bytes(bad_crc), "chunk IDAT at byte .* has a bad CRC")
    bad_ihdr = bytearray(good)
    bad_ihdr[20] ^= 0x01
    with pytest.raises(ServeError):  # Pillow, or the CRC: refused either way
        _decode(bytes(bad_ihdr))
    rows = filtered_rows(depth, [SUB] * H)
    z = zlib.compress(rows)
    _refused(png16(depth, [SUB] * H, stream=z[:len(z) // 2]), "zlib stream is cut short.*truncated")
    _refused(png16(depth, [SUB] * H, stream=b"\x00" * 64), "not valid zlib data")
    _refused(png16(depth, [SUB] * H, stream=zlib.compress(rows[:-10])), f"holds {len(rows) - 10} bytes but")
    _refused(png16(depth, [SUB] * H, stream=zlib.compress(rows + b"\x00" * 3000)), "inflates to more than")
    bad_filter = bytearray(rows)
    bad_filter[(1 + 2 * W) * 7] = 9
    _refused(png16(depth, [SUB] * H, stream=zlib.compress(bytes(bad_filter))), "row 7 has filter type 9")
    corrupt = bytearray(zlib.compress(rows))
    corrupt[-2] ^= 0xFF  # the Adler-32 checksum
    _refused(png16(depth, [SUB] * H, stream=bytes(corrupt)), "not valid zlib data")


def test_a_chunk_cut_short_or_a_missing_idat() -> None:
    depth = _depth(10)
    good = png16(depth, [SUB] * H)
    no_idat = b"\x89PNG\r\n\x1a\n" + ihdr(W, H) + chunk(b"IEND", b"")
    _refused(no_idat, "no IDAT chunk")
    # A length that runs past the end, with IEND still at the end (the truncation check passes).
    pos = good.index(b"IDAT") - 4
    long = good[:pos] + struct.pack(">I", 10**6) + good[pos + 4:]
    _refused(long, "runs past the end of the data")


def test_the_inflate_never_allocates_more_than_the_image() -> None:
    """A small stream that would inflate to far more than H x (1 + 2W) stops at that size and is refused."""
    depth = _depth(11, 8, 8)
    bomb = zlib.compress(b"\x00" * (64 << 20), 9)
    assert len(bomb) < 100_000
    with pytest.raises(ServeError, match="inflates to more than"):
        _decode(png16(depth, [SUB] * 8, stream=bomb), h=8, w=8)


def test_odd_sizes_match_opencv() -> None:
    rng = np.random.default_rng(12)
    for h, w in ((2, 2), (3, 97), (101, 5), (33, 64)):
        depth = rng.integers(0, 65536, (h, w)).astype(np.uint16)
        kinds = random_filters(rng, h)
        data = png16(depth, kinds)
        decoded, slot = _decode(data, h=h, w=w)
        d = decoded.depth
        rows = np.frombuffer(slot, np.uint8, d.nbytes, d.offset).reshape(h, 1 + 2 * w)
        expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(unfilter(rows, h, w), expected)


def test_inflating_stops_at_the_first_average_or_paeth_row() -> None:
    """Such an image goes as pixels (OpenCV decodes it): the rest of its stream is not inflated, so a
    stream cut short after an early Average row is not even looked at here."""
    depth = _depth(13)
    kinds = [SUB, AVERAGE] + [UP] * (H - 2)
    z = zlib.compress(filtered_rows(depth, kinds))
    image = parse(png16(depth, kinds, stream=z[:len(z) // 2]))
    assert image is not None
    assert inflate_into(image, np.empty(image.nbytes, np.uint8)) is None
    whole = parse(png16(depth, [SUB] * H))
    rows = inflate_into(whole, np.empty(whole.nbytes + 10, np.uint8))
    assert rows is not None and rows.shape == (H, 1 + 2 * W)


def test_the_chunk_limit_still_applies() -> None:
    """dd.frontend.image_cost's walk runs before the rows are read: a PNG of too many chunks is refused."""
    depth = _depth(14, 8, 8)
    z = zlib.compress(filtered_rows(depth, [SUB] * 8))
    many = b"\x89PNG\r\n\x1a\n" + ihdr(8, 8) + chunk(b"IDAT", z) + chunk(b"tEXt", b"k\x00v") * 17000 + chunk(b"IEND", b"")
    with pytest.raises(ServeError, match="more than 16384 chunks"):
        _decode(many, h=8, w=8)
