"""One JPEG decoded by several threads at once, where its restart markers allow, bit for bit as one decode.

A JPEG's entropy-coded data is one sequential stream: a decoder cannot start in the middle, so a
1280x720 frame takes one core 4-6 ms however many cores are idle. A JPEG written with a restart
interval (the DRI segment; libjpeg's `restart_interval`, OpenCV's IMWRITE_JPEG_RST_INTERVAL) resets
the decoder's state at every RSTn marker: the data between two markers decodes on its own. Where
those resets fall at the start of MCU rows, the rows between any two of them form a JPEG of their
own: the same header with the height changed, that stretch of data with its markers renumbered from
RST0, and an end marker. Each strip is then decoded by OpenCV (libjpeg-turbo) in its own thread.

Every pixel comes out as the decode of the whole image gives it (tests/unit/frontend/
test_jpeg_strips.py checks it bit for bit): the inverse DCT and the colour conversion work within
blocks and pixels, and the only step that looks across rows, libjpeg's "fancy" chroma upsampling,
looks one chroma row up and down. So each strip is decoded with one MCU row more above and below
than it keeps, where the image has them; those rows hold the context the kept rows need.

Only baseline and extended sequential (Huffman) JPEGs with one interleaved scan and 8-bit samples
qualify, with exactly as many restart markers as the interval implies; anything else returns None
from `restart_layout` and is decoded whole, as before. The client library writes its JPEGs with a
restart marker at every MCU row (dd.client.encoding): about 5 bytes a row.
"""

from __future__ import annotations

import re
import struct
from concurrent.futures import Executor
from dataclasses import dataclass

import cv2
import numpy as np

from dd.frontend.jpeg_header import EOI, SEQUENTIAL_HUFFMAN, SOF_MARKERS, SOS, header_segments

_SOF_OTHER = SOF_MARKERS - set(SEQUENTIAL_HUFFMAN)  # progressive, lossless, arithmetic
_DRI = 0xDD
# A marker in entropy-coded data: FF, then anything but 00 (a stuffed FF byte) or FF (fill before a
# marker: the match is then at the last FF). Not "\xff+": that pattern took 1.2 ms a frame, this 0.06.
_MARKER = re.compile(rb"\xff[^\x00\xff]")
_COLOR_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION


@dataclass(frozen=True)
class RestartLayout:
    """Where a JPEG's restart segments start and end, and which MCU rows they begin."""

    height: int
    width: int
    mcu_height: int  # pixel rows per MCU row: 8 x the largest vertical sampling factor
    mcu_rows: int
    sof_at: int  # offset of the SOF marker (its height field: sof_at + 5)
    scan_at: int  # offset of the entropy-coded data (after the SOS header)
    starts: tuple[int, ...]  # each restart segment's first byte
    ends: tuple[int, ...]  # each segment's end: its RST marker, or the EOI marker for the last
    row_segment: dict[int, int]  # MCU row -> the segment that starts it, for rows a segment starts

    def boundaries(self, strips: int) -> list[int]:
        """MCU rows where strips begin, a segment starting each, as even as the segments allow, and the
        end: [0, ..., mcu_rows]. Fewer strips than asked where the segments are too coarse."""
        rows = sorted(self.row_segment)
        out = [0]
        for k in range(1, strips):
            want = round(self.mcu_rows * k / strips)
            best = min(rows, key=lambda r: abs(r - want))
            if out[-1] < best < self.mcu_rows:
                out.append(best)
        return out + [self.mcu_rows]


def restart_layout(data: bytes) -> RestartLayout | None:
    """The JPEG's restart layout, or None when it cannot be decoded in strips (no restart interval, not
    sequential Huffman with one scan, markers missing or extra, cut short): decode it whole."""
    if data[:2] != b"\xff\xd8":
        return None
    sof_at, interval = -1, 0
    for marker, at, length in header_segments(data):
        if length < 2 or at + 2 + length > len(data) or marker in _SOF_OTHER or marker == EOI:
            return None
        if marker in SEQUENTIAL_HUFFMAN:
            if length < 8 or length != 8 + 3 * data[at + 9]:
                return None  # its component list does not fit its length: let the decoder say so
            sof_at = at
        elif marker == _DRI and length == 4:
            interval = struct.unpack_from(">H", data, at + 4)[0]
        elif marker == SOS:
            if length < 3 or length != 6 + 2 * data[at + 4]:
                return None
            return _layout(data, sof_at, interval, at, at + 2 + length)
    return None


def _layout(data: bytes, sof_at: int, interval: int, sos_at: int, scan_at: int) -> RestartLayout | None:
    if sof_at < 0 or interval == 0:
        return None
    precision, height, width, count = struct.unpack_from(">BHHB", data, sof_at + 4)
    if precision != 8 or count not in (1, 3) or height == 0 or width == 0 or data[sos_at + 4] != count:
        return None  # 12-bit, CMYK, a height set later (DNL), or one scan per component
    factors = [data[sof_at + 11 + 3 * k] for k in range(count)]  # each component: id, HV, table
    hmax, vmax = max(f >> 4 for f in factors), max(f & 15 for f in factors)
    if count == 1:
        hmax = vmax = 1  # a single component is not interleaved: its MCU is one 8x8 block
    if not (1 <= hmax <= 4 and 1 <= vmax <= 4):
        return None
    mcu_h, mcu_w = 8 * vmax, 8 * hmax
    per_row, rows = -(-width // mcu_w), -(-height // mcu_h)
    segments = -(-(per_row * rows) // interval)
    marks, eoi = [], -1
    for m in _MARKER.finditer(data, scan_at):
        code = data[m.start() + 1]
        if 0xD0 <= code <= 0xD7 and len(marks) < segments:
            marks.append(m.start())
            continue
        eoi = m.start() if code == EOI else -1
        break  # the end, or another scan, a DNL, too many restarts: none of them in strips
    if eoi < 0 or len(marks) != segments - 1:
        return None
    row_segment = {r: r * per_row // interval for r in range(rows) if r * per_row % interval == 0}
    return RestartLayout(height, width, mcu_h, rows, sof_at, scan_at, tuple([scan_at] + [m + 2 for m in marks]),
                         tuple(marks + [eoi]), row_segment)


def strip_jpeg(data: bytes, layout: RestartLayout, first_row: int, end_row: int) -> bytes:
    """A JPEG of MCU rows [first_row, end_row) (each a row a segment starts, or the end): the header
    with its height, those rows' segments with their markers renumbered from RST0, and EOI."""
    seg_a = layout.row_segment[first_row]
    seg_b = layout.row_segment[end_row] if end_row < layout.mcu_rows else len(layout.starts)
    height = min(layout.height, end_row * layout.mcu_height) - first_row * layout.mcu_height
    head = layout.scan_at
    out = bytearray(head + layout.ends[seg_b - 1] - layout.starts[seg_a] + 2)
    out[:head] = data[:head]
    struct.pack_into(">H", out, layout.sof_at + 5, height)
    out[head:-2] = data[layout.starts[seg_a]:layout.ends[seg_b - 1]]
    base = layout.starts[seg_a] - head
    for k, seg in enumerate(range(seg_a, seg_b - 1)):
        out[layout.ends[seg] - base + 1] = 0xD0 + (k & 7)
    out[-2:] = b"\xff\xd9"
    return bytes(out)


def _context_rows(layout: RestartLayout, first_row: int, end_row: int) -> tuple[int, int]:
    """The strip widened by the nearest rows a segment starts, above and below, for the upsampling."""
    above = [r for r in layout.row_segment if r < first_row]
    below = [r for r in layout.row_segment if r > end_row]
    return (max(above) if above else 0), (min(below) if below else layout.mcu_rows)


def decode_strip(data: bytes, layout: RestartLayout, first_row: int, end_row: int, dst: np.ndarray) -> bool:
    """Decodes MCU rows [first_row, end_row) into their rows of `dst` (H x W x 3 RGB); False when
    OpenCV cannot decode the strip (the caller decodes the image whole, to say what is wrong)."""
    a, b = _context_rows(layout, first_row, end_row)
    try:
        bgr = cv2.imdecode(np.frombuffer(strip_jpeg(data, layout, a, b), np.uint8), _COLOR_FLAGS)
    except cv2.error:
        return False
    top = first_row * layout.mcu_height
    bottom = min(layout.height, end_row * layout.mcu_height)
    skip = top - a * layout.mcu_height
    if bgr is None or bgr.ndim != 3 or bgr.shape[1] != layout.width or bgr.shape[0] < skip + bottom - top:
        return False
    cv2.cvtColor(bgr[skip:skip + bottom - top], cv2.COLOR_BGR2RGB, dst=dst[top:bottom])
    return True


def decode_in_strips(data: bytes, layout: RestartLayout, dst: np.ndarray, strips: int, pool: Executor) -> bool:
    """The whole image into `dst` (H x W x 3 RGB, C-contiguous), the first strip in this thread and the
    others on `pool`; False if any strip failed (its rows are then undefined: decode the image whole)."""
    bounds = layout.boundaries(strips)
    if len(bounds) < 3:
        return decode_strip(data, layout, 0, layout.mcu_rows, dst)
    others = [pool.submit(decode_strip, data, layout, bounds[k], bounds[k + 1], dst) for k in range(1, len(bounds) - 1)]
    ok = decode_strip(data, layout, bounds[0], bounds[1], dst)
    return all([f.result() for f in others]) and ok
