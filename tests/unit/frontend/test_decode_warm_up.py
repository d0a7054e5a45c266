"""The frontend's decode path warmed up before it serves (decode.warm_up): the first request then pays no
first-call costs, such as Pillow importing its format plugins at its first Image.open (9-10 ms), which
each frontend's first request paid before (run S9-4 on the H200: the server's total for the first
requests 61-69 ms against a p50 of 17-38 ms). Checked in a fresh interpreter by what a property that
timing cannot flake on: after the warm-up, decoding JPEG + PNG requests imports no module."""

from __future__ import annotations

from tests.fresh import run_fresh

CODE = """
import sys
import cv2, numpy as np
from dd.frontend.decode import decode_into_slot, warm_up
from dd.frontend.inputs import ImageInput, ZSTD
import zstandard
rng = np.random.default_rng(0)
color = rng.integers(0, 255, (120, 160, 3), np.uint8)
depth = rng.integers(500, 3000, (120, 160), np.uint16)
jpg, png = cv2.imencode(".jpg", color)[1].tobytes(), cv2.imencode(".png", depth)[1].tobytes()
zst = zstandard.ZstdCompressor().compress(depth.tobytes())
slot = memoryview(bytearray(1 << 20))
if sys.argv[1] == "warm":
    warm_up()
before = set(sys.modules)
for rows in (False, True):
    decode_into_slot(ImageInput(jpg), ImageInput(png), True, slot, 1 << 20, png_rows_to_worker=rows)
decode_into_slot(ImageInput(jpg), ImageInput(zst, ZSTD, (120, 160), "uint16"), True, slot, 1 << 20)
print(sorted(set(sys.modules) - before))
"""


def _imported_by_first_requests(mode: str) -> str:
    return run_fresh(CODE, mode)


def test_after_the_warm_up_the_first_requests_import_nothing() -> None:
    assert _imported_by_first_requests("warm") == "[]"


def test_without_it_they_would() -> None:  # the check above can fail: a cold process imports Pillow's plugins
    assert "PIL.PngImagePlugin" in _imported_by_first_requests("cold")
