"""dd.frontend.png_depth.inflate_parts_into: a depth PNG whose IDAT chunks end in full flushes (what the
client library writes, dd.client.encoding.encode_png16) is inflated in parts at once to exactly what one
inflate gives; a stream that only looks splittable, or is broken, gets inflate_into's answer."""

from __future__ import annotations

import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from dd.client.encoding import encode_png16
from dd.frontend import png_depth
from dd.frontend.png_depth import PngError, inflate_into, inflate_parts_into, parse
from dd.png_rows import unfilter
from dd.synth.scenes import generate_scene
from tests.png_writer import AVERAGE, SUB, chunk, filtered_rows, ihdr

POOL = ThreadPoolExecutor(4)


def depth(h: int = 720, w: int = 1280, seed: int = 2) -> np.ndarray:
    return generate_scene(seed, w, h).depth


def segmented(rows: bytes, h: int, w: int, segments: int, flush: int = zlib.Z_FULL_FLUSH,
              one_compressor: bool = False, trailer: int | None = None) -> bytes:
    """A PNG of the given inflated rows, compressed by zlib in `segments` runs of rows, each ended with
    `flush` and stored in an IDAT chunk of its own."""
    row = 1 + 2 * w
    step = -(-h // segments)
    shared = zlib.compressobj(1, zlib.DEFLATED, -15)
    z = [b"\x78\x01"]
    for top in range(0, h, step):
        c = shared if one_compressor else zlib.compressobj(1, zlib.DEFLATED, -15)
        last = top + step >= h
        z.append(c.compress(rows[top * row:(top + step) * row]) + c.flush(zlib.Z_FINISH if last else flush))
    z[-1] += struct.pack(">I", zlib.adler32(rows) if trailer is None else trailer)
    z[1] = z[0] + z[1]
    return b"\x89PNG\r\n\x1a\n" + ihdr(w, h) + b"".join(chunk(b"IDAT", p) for p in z[1:]) + chunk(b"IEND", b"")


def sequential(image) -> bytes:
    out = np.zeros(image.nbytes + 64, np.uint8)
    rows = inflate_into(image, out)
    return None if rows is None else rows.tobytes()


@pytest.mark.parametrize("h, w", [(720, 1280), (61, 83), (3, 5)])
def test_the_client_librarys_png_inflates_in_parts_to_its_rows(h: int, w: int) -> None:
    d = depth(h, w) if h > 8 else np.arange(h * w, dtype=np.uint16).reshape(h, w) * 977
    data = encode_png16(d)
    assert np.array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED), d)
    image = parse(data)
    assert len(image.flush_points) == min(h, 8) - 1
    for parts in (2, 3, 4, 8):
        out = np.full(image.nbytes + 64, 9, np.uint8)
        rows = inflate_parts_into(image, out, parts, POOL)
        assert rows is not None and rows.tobytes() == sequential(image)
        assert np.array_equal(unfilter(rows, h, w), d)
        assert (out[image.nbytes:] == 9).all()  # nothing written past the rows


def test_parts_are_inflated_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    image = parse(encode_png16(depth()))
    called = []
    monkeypatch.setattr(png_depth, "inflate_into", lambda *a: called.append(1))
    parts = []
    real = png_depth._inflate_part
    monkeypatch.setattr(png_depth, "_inflate_part", lambda *a: parts.append(a[1:3]) or real(*a))
    assert inflate_parts_into(image, np.zeros(image.nbytes, np.uint8), 4, POOL) is not None
    assert not called and len(parts) == 4 and sorted(parts)[0][0] == 2  # after the zlib header


def test_sync_flushes_keep_the_window_so_the_parts_fall_back_to_one_inflate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flush markers at each chunk's end, but one compressor: later parts refer back into earlier ones."""
    d = depth(240, 320)
    rows = filtered_rows(d, [SUB] * 240)
    image = parse(segmented(rows, 240, 320, 6, flush=zlib.Z_SYNC_FLUSH, one_compressor=True))
    assert len(image.flush_points) == 5
    fallbacks = []
    real = png_depth.inflate_into
    monkeypatch.setattr(png_depth, "inflate_into", lambda *a: fallbacks.append(1) or real(*a))
    out = np.zeros(image.nbytes, np.uint8)
    assert inflate_parts_into(image, out, 4, POOL).tobytes() == rows
    assert fallbacks == [1]


def test_a_wrong_checksum_is_refused_as_one_inflate_refuses_it() -> None:
    d = depth(240, 320)
    rows = filtered_rows(d, [SUB] * 240)
    image = parse(segmented(rows, 240, 320, 6, trailer=zlib.adler32(rows) ^ 1))
    with pytest.raises(PngError) as one:
        sequential(image)
    with pytest.raises(PngError) as parts:
        inflate_parts_into(image, np.zeros(image.nbytes, np.uint8), 4, POOL)
    assert str(parts.value) == str(one.value)


def test_too_many_or_too_few_bytes_are_refused_as_one_inflate_refuses_them() -> None:
    d = depth(240, 320)
    rows = filtered_rows(d, [SUB] * 240)
    for wrong in (rows[:-321], rows + rows[:321]):
        z = segmented(wrong, 240, 320, 6)
        image = parse(z)
        with pytest.raises(PngError) as one:
            sequential(image)
        with pytest.raises(PngError) as parts:
            inflate_parts_into(image, np.zeros(image.nbytes + 1000, np.uint8), 4, POOL)
        assert str(parts.value) == str(one.value)


def test_average_rows_in_a_part_send_the_image_as_pixels() -> None:
    d = depth(240, 320)
    filters = [SUB] * 240
    filters[200] = AVERAGE
    rows = filtered_rows(d, filters)
    image = parse(segmented(rows, 240, 320, 6))
    assert sequential(image) is None
    assert inflate_parts_into(image, np.zeros(image.nbytes, np.uint8), 4, POOL) is None


def test_a_stream_without_flush_points_is_one_inflate() -> None:
    ok, buf = cv2.imencode(".png", depth(240, 320))
    image = parse(buf.tobytes())
    assert image.flush_points == () and png_depth._part_starts(image, 4) == [0]
    assert inflate_parts_into(image, np.zeros(image.nbytes, np.uint8), 4, POOL).tobytes() == sequential(image)


def test_a_bad_filter_type_after_an_average_row_is_judged_as_one_inflate_judges_it() -> None:
    """The first row that is not None, Sub or Up decides: Average there means pixels, whatever follows."""
    d = depth(240, 320)
    rows = bytearray(filtered_rows(d, [SUB] * 240))
    row = 1 + 2 * 320
    for first, later in ((AVERAGE, 9), (9, AVERAGE)):
        rows[30 * row], rows[200 * row] = first, later
        image = parse(segmented(bytes(rows), 240, 320, 6))
        if first == AVERAGE:
            assert sequential(image) is None
            assert inflate_parts_into(image, np.zeros(image.nbytes, np.uint8), 4, POOL) is None
        else:
            with pytest.raises(PngError) as one:
                sequential(image)
            with pytest.raises(PngError) as parts:
                inflate_parts_into(image, np.zeros(image.nbytes, np.uint8), 4, POOL)
            assert str(parts.value) == str(one.value) and "row 30 has filter type 9" in str(one.value)


class _NoUnusedData:
    """isal_zlib's decompressor as isal 1.7 and 1.8 behave: after a raw stream's final block,
    unused_data stays empty (the checksum that follows is swallowed)."""

    def __init__(self, real) -> None:
        self._real = real

    def __getattr__(self, name: str):
        return b"" if name == "unused_data" else getattr(self._real, name)


def test_parts_do_not_fall_back_where_isal_reports_no_unused_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """With isal 1.7.1 (setup.cfg's floor; what the H200 runs of session 11 carried) every split PNG fell
    back to one inflate after its parts: twice the work, and slower than no split (6.0 -> 10.2 ms there)."""
    image = parse(encode_png16(depth()))
    expected = sequential(image)
    real = png_depth.isal_zlib.decompressobj
    monkeypatch.setattr(png_depth.isal_zlib, "decompressobj",
                        lambda *a: _NoUnusedData(real(*a)) if a == (-15,) else real(*a))
    called = []
    monkeypatch.setattr(png_depth, "inflate_into", lambda *a: called.append(1))
    rows = inflate_parts_into(image, np.zeros(image.nbytes, np.uint8), 4, POOL)
    assert not called and rows is not None and rows.tobytes() == expected


def test_a_wrong_checksum_is_refused_where_isal_reports_no_unused_data(monkeypatch: pytest.MonkeyPatch) -> None:
    d = depth(240, 320)
    rows = filtered_rows(d, [SUB] * 240)
    image = parse(segmented(rows, 240, 320, 6, trailer=zlib.adler32(rows) ^ 1))
    real = png_depth.isal_zlib.decompressobj
    monkeypatch.setattr(png_depth.isal_zlib, "decompressobj",
                        lambda *a: _NoUnusedData(real(*a)) if a == (-15,) else real(*a))
    with pytest.raises(PngError):
        inflate_parts_into(image, np.zeros(image.nbytes, np.uint8), 4, POOL)
