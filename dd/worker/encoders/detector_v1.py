"""detector_v1: an engine's Detections -> the serialized deep_detection.v1.DetectResponse.

Built and serialized in the worker, so the frontend only forwards bytes. Masks
become COCO compressed RLE (engines/masks.py: pycocotools, or the engine's own strings), the format
every COCO tool reads.
"""

from __future__ import annotations

import time


from dd.proto.deep_detection.v1 import detector_pb2 as pb
from dd.worker.encoders import EncodeContext
from dd.worker.engines.base import Detections
from dd.worker.engines.host_rle import rle_encode


def build_response(det: Detections, categories: tuple[str, ...], *, request_id: str, model: str,
                   height: int, width: int, mask_format: int, worker: str) -> pb.DetectResponse:
    resp = pb.DetectResponse(request_id=request_id, model=model, height=height, width=width, worker=worker)
    with_masks = mask_format == pb.RLE and (det.masks is not None or det.rle is not None)
    counts = (det.rle if det.rle is not None else rle_encode(det.masks)) if with_masks else []
    boxes = det.boxes.tolist()
    scores = det.scores.tolist()
    labels = det.labels.tolist()
    add = resp.instances.add
    # The worker's one inference thread encodes every response while the GPU runs the next batch, and at
    # saturation it is the limit (BENCHMARKS.md, S11-7): each submessage is looked up once (every
    # `inst.box` makes a new wrapper): 0.46 -> 0.34 ms for 100 instances with 6 KB masks on the CPU box
    # (scripts/bench_encode.py).
    for i in range(len(scores)):
        label = int(labels[i])
        inst = add(class_id=label, score=scores[i],
                   class_name=categories[label - 1] if 0 < label <= len(categories) else str(label))
        box = inst.box
        box.x1, box.y1, box.x2, box.y2 = boxes[i]
        mask = inst.mask
        if with_masks:
            mask.format = pb.RLE
            mask.height = height
            mask.width = width
            mask.counts = counts[i]
        else:
            mask.format = pb.NONE
    return resp


def encode(det: Detections, ctx: EncodeContext) -> bytes:
    """The response's bytes, with the worker's timings in its `timing` (postprocess_us: the encoding)."""
    t0 = time.perf_counter()
    resp = build_response(det, ctx.categories, request_id=ctx.request_id, model=ctx.model, height=ctx.height,
                          width=ctx.width, mask_format=ctx.mask_format, worker=ctx.worker)
    tm, t = resp.timing, ctx.timings
    tm.queued_us = t.queue_us
    tm.decode_us = t.decode_us
    tm.inference_us = t.inference_us
    tm.batch_size = t.batch_size
    t.encode_us = int((time.perf_counter() - t0) * 1e6)
    tm.postprocess_us = t.encode_us
    t.total_us = max(0, int((time.time() - ctx.received_at) * 1e6)) if ctx.received_at else 0
    tm.total_us = t.total_us
    return resp.SerializeToString()
