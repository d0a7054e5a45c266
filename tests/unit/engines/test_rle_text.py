"""RleText (dd.worker.engines.base): RLE strings in one buffer read as the list of bytes they replace."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_util

from dd.worker.engines.base import RleText

STRINGS = [b"0", b"", b"52203", b"PP1"]


def _text(strings: list[bytes]) -> RleText:
    return RleText(np.frombuffer(b"".join(strings) or b"\0", np.uint8)[:sum(map(len, strings))],
                   np.cumsum([0] + [len(s) for s in strings]).tolist())


def test_it_reads_as_the_list_of_bytes() -> None:
    text = _text(STRINGS)
    assert len(text) == 4 and list(text) == STRINGS and text == STRINGS and text == tuple(STRINGS)
    assert [text[i] for i in range(4)] == STRINGS and text[-1] == b"PP1" and isinstance(text[2], bytes)
    assert [bytes(v) for v in text.views()] == STRINGS and text.lengths().tolist() == [1, 0, 5, 3] and text.nbytes() == 9
    with pytest.raises(IndexError):
        text[4]
    assert text != STRINGS[:3] and text != [b"1", b"", b"52203", b"PP1"]


def test_a_slice_shares_the_buffer_and_reads_as_the_lists_slice() -> None:
    text = _text(STRINGS)
    for cut in (slice(1, 3), slice(2, None), slice(3, 1), slice(None, None, 2), slice(None, None, -1)):
        part = text[cut]
        assert isinstance(part, RleText) and list(part) == STRINGS[cut], cut
    assert text[1:3].views()[1].obj is text.views()[0].obj  # no copy


def test_pycocotools_decodes_its_items() -> None:
    mask = np.zeros((6, 4), np.uint8, order="F")
    mask[1:4, 1:3] = 1
    counts = mask_util.encode(mask)["counts"]
    text = _text([counts, counts])
    assert np.array_equal(mask_util.decode({"size": [6, 4], "counts": text[1]}), mask)
