"""dd.frontend.jpeg_header: which JPEGs may go to the worker compressed."""

from __future__ import annotations

import pytest

from dd.frontend.jpeg_header import JpegFrame, jpeg_frame, worker_decodable
from tests.jpeg_samples import exif_rotated, jpeg, photo, with_app14_adobe, with_sof


@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
def test_baseline_color_jpegs_go_to_the_worker(subsampling: int) -> None:
    data = jpeg(photo(), subsampling=subsampling)
    frame = jpeg_frame(data)
    assert frame is not None and frame.marker == 0xC0 and frame.precision == 8 and frame.jfif
    assert worker_decodable(data)


def test_an_exif_rotated_jpeg_goes_too() -> None:
    assert worker_decodable(exif_rotated(photo()))  # both sides ignore the orientation


@pytest.mark.parametrize("kind", ["progressive", "grayscale", "cmyk", "12-bit", "arithmetic", "adobe-rgb"])
def test_jpegs_decoders_disagree_on_stay_in_the_frontend(kind: str) -> None:
    base = jpeg(photo())
    data = {"progressive": lambda: jpeg(photo(), progressive=True),
            "grayscale": lambda: jpeg(photo(), mode="L"),
            "cmyk": lambda: jpeg(photo(), mode="CMYK"),
            "12-bit": lambda: with_sof(base, precision=12),
            "arithmetic": lambda: with_sof(base, marker=0xC9),
            "adobe-rgb": lambda: with_app14_adobe(base, 0)}[kind]()
    assert jpeg_frame(data) is not None
    assert not worker_decodable(data)


def test_an_adobe_ycbcr_jpeg_goes_to_the_worker() -> None:
    data = with_app14_adobe(jpeg(photo()), 1)
    frame = jpeg_frame(data)
    assert frame is not None and not frame.jfif and frame.adobe_transform == 1
    assert worker_decodable(data)


def test_components_named_rgb_without_markers_are_rgb() -> None:
    assert not JpegFrame(0xC0, 8, (0x52, 0x47, 0x42), False, None).worker_decodable()
    assert JpegFrame(0xC0, 8, (1, 2, 3), False, None).worker_decodable()
    assert JpegFrame(0xC1, 8, (1, 2, 3), True, None).worker_decodable()


@pytest.mark.parametrize("data", [b"\xff\xd8", b"\xff\xd8\xff", b"\xff\xd8\x00\x00\x00\x00",
                                  b"\xff\xd8\xff\xda\x00\x08abcdef\xff\xd9", b"\xff\xd8\xff\xe0\x00"])
def test_headers_without_a_frame_are_left_to_the_frontend(data: bytes) -> None:
    assert jpeg_frame(data) is None and not worker_decodable(data)


def test_a_header_cut_inside_the_frame_is_left_to_the_frontend() -> None:
    data = jpeg(photo())
    sof = data.index(b"\xff\xc0")
    assert not worker_decodable(data[:sof + 6])
