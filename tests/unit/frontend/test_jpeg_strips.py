"""dd.frontend.jpeg_strips: a JPEG with restart markers decoded in strips on several threads gives the
pixels of one whole decode, bit for bit, for every chroma subsampling, size, restart interval and strip
count; JPEGs that cannot be split are recognised and left whole."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from dd.frontend import jpeg_strips
from dd.frontend.jpeg_strips import decode_in_strips, restart_layout, strip_jpeg
from tests.conftest import scene

POOL = ThreadPoolExecutor(4)
FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
SAMPLING = {"420": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420, "422": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
            "444": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444, "411": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_411,
            "440": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_440}
MCU = {"420": (16, 16), "422": (8, 16), "444": (8, 8), "411": (8, 32), "440": (16, 8), "gray": (8, 8)}


def encode(h: int, w: int, sampling: str, interval: int | None, seed: int = 1, quality: int = 95) -> bytes:
    color, _ = scene(seed, h=h, w=w)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    if interval is not None:
        params += [cv2.IMWRITE_JPEG_RST_INTERVAL, interval]
    if sampling == "gray":
        image = cv2.cvtColor(color, cv2.COLOR_RGB2GRAY)
    else:
        image = color[..., ::-1]
        params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, SAMPLING[sampling]]
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(image), params)
    assert ok
    return buf.tobytes()


def whole(data: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), FLAGS), cv2.COLOR_BGR2RGB)


def strips(data: bytes, n: int) -> np.ndarray:
    layout = restart_layout(data)
    assert layout is not None
    out = np.full((layout.height, layout.width, 3), 7, np.uint8)
    assert decode_in_strips(data, layout, out, n, POOL)
    return out


@pytest.mark.parametrize("sampling", list(SAMPLING) + ["gray"])
@pytest.mark.parametrize("h, w", [(720, 1280), (721, 1283), (97, 130)])
def test_strips_give_the_whole_decodes_pixels_at_each_subsampling_and_size(sampling: str, h: int, w: int) -> None:
    mh, mw = MCU[sampling]
    data = encode(h, w, sampling, -(-w // mw))  # a restart marker at every MCU row
    want = whole(data)
    layout = restart_layout(data)
    assert layout is not None and (layout.height, layout.width, layout.mcu_height) == (h, w, mh)
    for n in (2, 3, 4, 7):
        np.testing.assert_array_equal(strips(data, n), want, err_msg=f"{n} strips")


@pytest.mark.parametrize("rows_per_interval", [0.5, 2, 3, None])
def test_strips_start_only_where_a_restart_segment_starts_an_mcu_row(rows_per_interval: float | None) -> None:
    """Half a row (two segments a row), two and three rows a segment, and 7 MCUs (rows begin a segment
    only every 7 rows of 80 MCUs): each split only at rows that begin a segment, and exact."""
    per_row = 80
    interval = 7 if rows_per_interval is None else int(per_row * rows_per_interval)
    data = encode(720, 1280, "420", interval, seed=3)
    layout = restart_layout(data)
    assert layout is not None
    for n in (2, 4, 6):
        bounds = layout.boundaries(n)
        assert bounds[0] == 0 and bounds[-1] == 45 and bounds == sorted(set(bounds))
        assert all(b in layout.row_segment for b in bounds[:-1])
        if interval == 7:
            assert all(b % 7 == 0 for b in bounds[:-1])
    np.testing.assert_array_equal(strips(data, 4), whole(data))


def test_a_strip_is_a_jpeg_of_its_rows() -> None:
    data = encode(720, 1280, "420", 80)
    layout = restart_layout(data)
    part = cv2.imdecode(np.frombuffer(strip_jpeg(data, layout, 10, 20), np.uint8), FLAGS)
    assert part.shape == (160, 1280, 3)
    # away from the strip's edges (the upsampling's context), its rows are the whole image's
    np.testing.assert_array_equal(cv2.cvtColor(part, cv2.COLOR_BGR2RGB)[1:-1], whole(data)[161:319])
    last = cv2.imdecode(np.frombuffer(strip_jpeg(data, layout, 40, 45), np.uint8), FLAGS)
    assert last.shape == (720 - 640, 1280, 3)


def test_jpegs_that_cannot_be_split_are_left_whole() -> None:
    plain = encode(240, 320, "420", None)
    assert restart_layout(plain) is None  # no restart interval
    color, _ = scene(2)
    ok, progressive = cv2.imencode(".jpg", color, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_RST_INTERVAL, 20])
    assert ok and restart_layout(progressive.tobytes()) is None
    data = encode(240, 320, "420", 20)
    assert restart_layout(data) is not None
    eoi = data.rindex(b"\xff\xd9")
    assert restart_layout(data[:eoi]) is None  # cut short: no end marker
    assert restart_layout(data[:len(data) // 2]) is None
    first = data.index(b"\xff\xd0")
    assert restart_layout(data[:first] + data[first + 2:]) is None  # a marker missing
    assert restart_layout(data[:first] + b"\xff\xd0" + data[first:]) is None  # one too many
    for junk in (b"", b"\xff\xd8", b"\xff\xd8\xff", b"not a jpeg at all", b"\x89PNG\r\n\x1a\n" + bytes(40)):
        assert restart_layout(junk) is None


def test_a_strip_opencv_cannot_decode_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(240, 320, "420", 20)
    layout = restart_layout(data)
    calls = []
    real = cv2.imdecode

    def refuse_second(buf: np.ndarray, flags: int) -> np.ndarray | None:
        calls.append(len(buf))
        return None if len(calls) == 2 else real(buf, flags)

    monkeypatch.setattr(jpeg_strips.cv2, "imdecode", refuse_second)
    assert not decode_in_strips(data, layout, np.zeros((240, 320, 3), np.uint8), 3, POOL)
    assert len(calls) == 3  # every strip ended before the answer


def test_damaged_headers_and_data_never_raise() -> None:
    """Bytes flipped anywhere (headers included): a layout or None, and a decode that succeeds or says it
    failed; never an exception (the frontend's fuzz test covers what the client then hears)."""
    data = encode(97, 130, "420", 9)
    rng = np.random.default_rng(0)
    for _ in range(400):
        damaged = bytearray(data)
        for pos in rng.integers(0, len(data), int(rng.integers(1, 4))):
            damaged[pos] = int(rng.integers(0, 256))
        cut = bytes(damaged[:int(rng.integers(2, len(data) + 1))]) if rng.random() < 0.2 else bytes(damaged)
        layout = restart_layout(cut)
        if layout is not None and layout.height * layout.width <= 4 * 97 * 130:  # the frontend checks the size
            decode_in_strips(cut, layout, np.zeros((layout.height, layout.width, 3), np.uint8), 3, POOL)
