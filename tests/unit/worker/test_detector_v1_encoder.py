"""detector_v1.encode builds a response through protobuf, or, with much RLE, writes its instances in
protobuf's wire format itself (the worker's inference thread encodes every response, and at saturation it
is the limit): either way the bytes must stay exactly what setting every field through the message gives,
for any detections, odd labels, zeros, -0.0, empty masks and RLE strings in one buffer included."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dd.proto.deep_detection.v1 import detector_pb2 as pb
from dd.worker.encoders import EncodeContext, Timings
from dd.worker.encoders import detector_v1
from dd.worker.encoders.detector_v1 import encode, instances_bytes
from dd.worker.engines.base import Detections, RleText

CATEGORIES = ("box", "bé", "")
coords = st.one_of(st.floats(width=32, allow_nan=False), st.sampled_from([0.0, -0.0]))


def field_by_field(det: Detections, categories: tuple[str, ...], height: int, width: int, mask_format: int,
                   timing: pb.Timing) -> bytes:
    """The response as the encoder built it before session 12: every field set through its message."""
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
            inst.mask.counts = bytes(det.rle[i])
        else:
            inst.mask.format = pb.NONE
    tm = resp.timing
    tm.queued_us, tm.decode_us, tm.inference_us = timing.queued_us, timing.decode_us, timing.inference_us
    tm.batch_size, tm.postprocess_us, tm.total_us = timing.batch_size, timing.postprocess_us, timing.total_us
    return resp.SerializeToString()


def _context(height: int, width: int, mask_format: int, timings: Timings, received_at: float = 0.0) -> EncodeContext:
    return EncodeContext(CATEGORIES, "r", "m", "w", height, width, mask_format, timings, received_at)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), n=st.integers(0, 6), mask_format=st.sampled_from([pb.RLE, pb.NONE]), with_rle=st.booleans(),
       one_buffer=st.booleans(), height=st.integers(0, 4000), width=st.integers(0, 4000),
       times=st.lists(st.integers(0, 2**40), min_size=4, max_size=4), received=st.sampled_from([0.0, 1.0]),
       wire_from=st.sampled_from([0, 2**62]))
def test_the_same_bytes_as_setting_each_field_through_the_message(data, n, mask_format, with_rle, one_buffer, height,
                                                                   width, times, received, wire_from) -> None:
    boxes = np.array(data.draw(st.lists(st.lists(coords, min_size=4, max_size=4), min_size=n, max_size=n)),
                     np.float32).reshape(n, 4)
    scores = np.array(data.draw(st.lists(coords, min_size=n, max_size=n)), np.float32)
    labels = np.array(data.draw(st.lists(st.integers(-5, 2**31 - 1) | st.integers(0, 4), min_size=n, max_size=n)),
                      np.int64)
    # RLE strings of every varint length up to three bytes (an engine's are memoryviews of one buffer)
    sizes = data.draw(st.lists(st.sampled_from([0, 1, 30, 127, 128, 300, 16383, 16384, 70000]), min_size=n,
                               max_size=n))
    rle = [bytes([48 + k % 40]) * size for k, size in enumerate(sizes)] if with_rle else None
    if rle is not None and one_buffer:
        rle = RleText(np.frombuffer(b"".join(rle), np.uint8), np.cumsum([0] + sizes).tolist())
    det = Detections(boxes, scores, labels, None, rle)
    timings = Timings(queue_us=times[0], decode_us=times[1], inference_us=times[2], batch_size=times[3] % 2**31)
    saved, detector_v1.WIRE_FROM_BYTES = detector_v1.WIRE_FROM_BYTES, wire_from  # each way of writing instances
    try:
        body = encode(det, _context(height, width, mask_format, timings, received))
    finally:
        detector_v1.WIRE_FROM_BYTES = saved
    got = pb.DetectResponse.FromString(body).timing
    assert got.postprocess_us == timings.encode_us and got.total_us == timings.total_us
    assert body == field_by_field(det, CATEGORIES, height, width, mask_format, got)


def test_an_instance_is_one_protobuf_instance_each() -> None:
    """Parsed back: each instance's own fields, in order (a length off by one would shift every later one)."""
    n = 200
    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 1000, (n, 4)).astype(np.float32)
    boxes[::7, 0] = 0.0
    rle = [bytes(rng.integers(48, 100, int(size), dtype=np.uint8)) for size in rng.integers(0, 20000, n)]
    det = Detections(boxes, rng.uniform(0, 1, n).astype(np.float32), rng.integers(1, 4, n), None, rle)
    resp = pb.DetectResponse.FromString(instances_bytes(det, CATEGORIES, 720, 1280, rle))
    assert len(resp.instances) == n
    for i, inst in enumerate(resp.instances):
        assert inst.class_id == det.labels[i] and inst.class_name == CATEGORIES[det.labels[i] - 1]
        assert inst.score == det.scores[i] and [inst.box.x1, inst.box.y1, inst.box.x2, inst.box.y2] == boxes[i].tolist()
        assert (inst.mask.height, inst.mask.width, inst.mask.counts) == (720, 1280, rle[i])


def test_a_length_beyond_the_varints_written_here_is_refused() -> None:
    class Huge(bytes):
        def __len__(self) -> int:
            return 2**35

    det = Detections(np.ones((1, 4), np.float32), np.ones(1, np.float32), np.ones(1, np.int64), None, [Huge()])
    with pytest.raises(ValueError, match="2\\*\\*35"):
        instances_bytes(det, CATEGORIES, 1, 1, det.rle)
