"""detector_v1.build_response looks each instance's submessages up once (the worker's inference thread
encodes every response, and at saturation it is the limit): the bytes must stay exactly what setting
every field through the message gives, for any detections, odd labels, zeros and empty masks included."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dd.proto.deep_detection.v1 import detector_pb2 as pb
from dd.worker.encoders.detector_v1 import build_response
from dd.worker.engines.base import Detections

CATEGORIES = ("box", "bé", "")
coords = st.one_of(st.floats(width=32, allow_nan=False), st.sampled_from([0.0, -0.0]))


def field_by_field(det: Detections, categories: tuple[str, ...], height: int, width: int, mask_format: int) -> bytes:
    """The response as the encoder built it before session 11: every field set through its message."""
    resp = pb.DetectResponse(request_id="r", model="m", height=height, width=width, worker="w")
    with_masks = mask_format == pb.RLE and det.rle is not None
    for i in range(len(det.scores)):
        label = int(det.labels[i])
        inst = resp.instances.add(class_id=label, score=float(det.scores[i]),
                                  class_name=categories[label - 1] if 0 < label <= len(categories) else str(label))
        x1, y1, x2, y2 = (float(v) for v in det.boxes[i])
        inst.box.x1, inst.box.y1, inst.box.x2, inst.box.y2 = x1, y1, x2, y2
        if with_masks:
            inst.mask.format = pb.RLE
            inst.mask.height = height
            inst.mask.width = width
            inst.mask.counts = det.rle[i]
        else:
            inst.mask.format = pb.NONE
    return resp.SerializeToString()


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n=st.integers(0, 6), mask_format=st.sampled_from([pb.RLE, pb.NONE]), with_rle=st.booleans(),
       height=st.integers(0, 4000), width=st.integers(0, 4000))
def test_the_same_bytes_as_setting_each_field_through_the_message(data, n, mask_format, with_rle, height,
                                                                   width) -> None:
    boxes = np.array(data.draw(st.lists(st.lists(coords, min_size=4, max_size=4), min_size=n, max_size=n)),
                     np.float32).reshape(n, 4)
    scores = np.array(data.draw(st.lists(coords, min_size=n, max_size=n)), np.float32)
    labels = np.array(data.draw(st.lists(st.integers(-5, 2**31 - 1) | st.integers(0, 4), min_size=n, max_size=n)),
                      np.int64)
    rle = data.draw(st.lists(st.binary(max_size=30), min_size=n, max_size=n)) if with_rle else None
    det = Detections(boxes, scores, labels, None, rle)
    built = build_response(det, CATEGORIES, request_id="r", model="m", height=height, width=width,
                           mask_format=mask_format, worker="w")
    assert built.SerializeToString() == field_by_field(det, CATEGORIES, height, width, mask_format)
