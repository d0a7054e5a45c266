"""detector_v1: an engine's Detections -> the serialized deep_detection.v1.DetectResponse.

Built and serialized in the worker, so the frontend only forwards bytes. Masks
become COCO compressed RLE (engines/masks.py: pycocotools, or the engine's own strings), the format
every COCO tool reads.

The worker's one inference thread encodes every response while the GPU runs the next batch, and at
saturation that thread's host work is what limits a worker (BENCHMARKS.md, S12). Building the message
through protobuf costs about 2.5 us per instance on the CI box, plus a copy of the RLE strings into
the message and another when serializing: 0.5-0.75 ms per image on the H200's host with 100
instances and 700 KB of RLE (random weights paint noisy masks). A response with that much RLE has
its instances written in protobuf's wire format directly instead (instances_bytes): everything but
the RLE strings is a few dozen numpy operations over all instances at once (tags, float bits, varint
lengths), and one join copies each RLE string once, straight from where the engine read them back
(RleText). Those numpy operations cost about 0.2 ms whatever the count, more than protobuf spends
on a response of a few small masks (what a trained model mostly answers), so below WIRE_FROM_BYTES
of RLE protobuf builds the message. The fields around the instances (request id, model, sizes,
timing, worker) are serialized by protobuf either way, and both ways give exactly the bytes
protobuf gives for the same message (proto3: a zero scalar or an empty string is left out, -0.0 is
kept; fields in number order): tests/unit/worker/test_detector_v1_encoder.py compares them over
generated detections.
"""

from __future__ import annotations

import functools
import time
from typing import Sequence

import numpy as np

from dd.proto.deep_detection.v1 import detector_pb2 as pb
from dd.worker.encoders import EncodeContext
from dd.worker.engines.base import Detections, RleText
from dd.worker.engines.host_rle import rle_encode

_LEN = 2  # wire type: length-delimited
_FIXED32 = 5
_INSTANCES = (5 << 3) | _LEN  # DetectResponse.instances
_SCORE = (3 << 3) | _FIXED32  # Instance.score
_BOX = (4 << 3) | _LEN  # Instance.box
_MASK = (5 << 3) | _LEN  # Instance.mask
_COUNTS = (4 << 3) | _LEN  # Mask.counts
_BOX_FIELDS = [((k + 1) << 3) | _FIXED32 for k in range(4)]  # Box.x1, y1, x2, y2
# RLE bytes in a response from which its instances are written here rather than built by protobuf (CI box,
# strings in one buffer, one response: 100 instances x 7 KB 0.75-0.79 ms by protobuf, 0.49-0.63 here; 100 x
# 300 B 0.27-0.50 and 0.31-0.58; 20 x 300 B 0.06-0.11 and 0.22-0.42; BENCHMARKS.md, session 12).
WIRE_FROM_BYTES = 64 * 1024
_VARINT_MAX = 5  # bytes: every length here is below 2**35
_SHIFTS = np.arange(_VARINT_MAX, dtype=np.int64) * 7


def _varints(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each non-negative value's varint, all at once: its bytes as the rows of an [n, 5] uint8 array and
    which of them belong to it (protobuf's length prefixes)."""
    v = values.astype(np.int64)
    if len(v) and int(v.max()) >> (7 * _VARINT_MAX):
        raise ValueError("a length of 2**35 bytes or more cannot be encoded here")
    groups = v[:, None] >> _SHIFTS  # [n, 5]: the value from each 7-bit group up
    keep = groups != 0
    keep[:, 0] = True
    more = np.zeros(groups.shape, bool)
    more[:, :-1] = keep[:, 1:]
    return ((groups & 0x7F) | (more << 7)).astype(np.uint8), keep


@functools.lru_cache(maxsize=4096)
def _class_prefix(label: int, categories: tuple[str, ...]) -> np.ndarray:
    """Instance.class_id and class_name, as protobuf writes them (either left out when empty), as uint8:
    the same for every instance of a class, so made once per class and model (a protobuf message per
    call cost more than the rest of a class's columns)."""
    name = categories[label - 1] if 0 < label <= len(categories) else str(label)
    return np.frombuffer(pb.Instance(class_id=label, class_name=name).SerializeToString(), np.uint8)


def _fixed32s(tags: list[int], values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float fields (one column of `values` per tag) as tag + 4 little-endian bytes each, [n, 5 x fields],
    and which are written: every one whose bits are not all zero (protobuf leaves 0.0 out, keeps -0.0)."""
    n, k = values.shape
    f = np.ascontiguousarray(values, dtype="<f4")
    out = np.empty((n, k, 5), np.uint8)
    out[:, :, 0] = tags
    out[:, :, 1:] = f.view(np.uint8).reshape(n, k, 4)
    on = f.view("<u4") != 0
    return out.reshape(n, 5 * k), np.repeat(on, 5, axis=1)


def instances_bytes(det: Detections, categories: tuple[str, ...], height: int, width: int,
                    counts: Sequence[bytes | memoryview] | None, lengths: np.ndarray | None = None) -> bytes:
    """The DetectResponse.instances fields of these detections, serialized: each instance's class,
    score, box and mask (with `counts`, its RLE string, as Mask.counts with the image's size; without,
    a mask of format NONE). lengths: the strings' lengths where the caller has them (RleText.lengths)."""
    return b"".join(instance_pieces(det, categories, height, width, counts, lengths))


@functools.lru_cache(maxsize=256)
def _mask_head(height: int, width: int, rle: bool) -> np.ndarray:
    """Mask.format, height and width as protobuf writes them (the same for every instance of an image)."""
    mask = pb.Mask(format=pb.RLE, height=height, width=width) if rle else pb.Mask(format=pb.NONE)
    return np.frombuffer(mask.SerializeToString(), np.uint8)


def instance_pieces(det: Detections, categories: tuple[str, ...], height: int, width: int,
                    counts: Sequence[bytes | memoryview] | None, lengths: np.ndarray | None = None
                    ) -> list[bytes | memoryview]:
    """instances_bytes as the pieces to join (each instance's fields up to its RLE string, then the string):
    encode joins them with the fields around them, so that the RLE is copied once."""
    n = len(det.scores)
    if n == 0:
        return []
    ones = np.ones((n, 1), bool)
    # class_id and class_name: one prefix per label, in columns as wide as the longest
    labels = np.asarray(det.labels).astype(np.int64, copy=False)
    prefixes = {int(u): _class_prefix(int(u), categories) for u in np.unique(labels)}
    cls = np.zeros((n, max(len(p) for p in prefixes.values())), np.uint8)
    cls_on = np.zeros(cls.shape, bool)
    for label, prefix in prefixes.items():
        sel = labels == label
        cls[sel, :len(prefix)] = prefix
        cls_on[sel, :len(prefix)] = True
    score, score_on = _fixed32s([_SCORE], np.asarray(det.scores).reshape(n, 1))
    # the box is always there (its fields are set), each coordinate unless zero
    coords, coords_on = _fixed32s(_BOX_FIELDS, np.asarray(det.boxes).reshape(n, 4))
    box_len = coords_on.sum(1)
    box_head = np.empty((n, 2), np.uint8)
    box_head[:, 0] = _BOX
    box_head[:, 1] = box_len
    # the mask: its tag and length, its format and size, then the counts' tag and length (the counts follow)
    mask_head = _mask_head(height, width, counts is not None)
    if counts is None:
        clen = np.zeros(n, np.int64)
    else:
        clen = np.fromiter((len(c) for c in counts), np.int64, n) if lengths is None else lengths
    has_counts = clen > 0
    counts_len, counts_len_on = _varints(clen)
    counts_len_on &= has_counts[:, None]
    mask_len = len(mask_head) + has_counts * (1 + counts_len_on.sum(1)) + clen
    mask_len_bytes, mask_len_on = _varints(mask_len)
    body = cls_on.sum(1) + score_on.sum(1) + 2 + box_len + 1 + mask_len_on.sum(1) + mask_len
    body_len, body_len_on = _varints(body)
    blocks = [(np.full((n, 1), _INSTANCES, np.uint8), ones), (body_len, body_len_on), (cls, cls_on),
              (score, score_on), (box_head, np.ones((n, 2), bool)), (coords, coords_on),
              (np.full((n, 1), _MASK, np.uint8), ones), (mask_len_bytes, mask_len_on),
              (np.broadcast_to(mask_head, (n, len(mask_head))), np.ones((n, len(mask_head)), bool)),
              (np.full((n, 1), _COUNTS, np.uint8), has_counts[:, None]), (counts_len, counts_len_on)]
    row = np.concatenate([b for b, _ in blocks], axis=1)
    keep = np.concatenate([k for _, k in blocks], axis=1)
    flat = row[keep].tobytes()
    ends = np.cumsum(keep.sum(1)).tolist()
    pieces: list[bytes | memoryview] = [b""] * (2 * n)
    pieces[0::2] = [flat[a:b] for a, b in zip([0] + ends[:-1], ends)]
    if counts is not None:
        pieces[1::2] = counts
    return pieces


def add_instances(resp: pb.DetectResponse, det: Detections, categories: tuple[str, ...], height: int,
                  width: int, counts: Sequence[bytes] | None) -> None:
    """The instances through protobuf (responses with little RLE): each submessage looked up once
    (every `inst.box` makes a new wrapper)."""
    boxes = det.boxes.tolist()
    scores = det.scores.tolist()
    labels = det.labels.tolist()
    add = resp.instances.add
    for i in range(len(scores)):
        label = int(labels[i])
        inst = add(class_id=label, score=scores[i],
                   class_name=categories[label - 1] if 0 < label <= len(categories) else str(label))
        box = inst.box
        box.x1, box.y1, box.x2, box.y2 = boxes[i]
        mask = inst.mask
        if counts is not None:
            mask.format = pb.RLE
            mask.height = height
            mask.width = width
            mask.counts = counts[i]
        else:
            mask.format = pb.NONE


def encode(det: Detections, ctx: EncodeContext) -> bytes:
    """The response's bytes, with the worker's timings in its `timing` (postprocess_us: the encoding)."""
    t0 = time.perf_counter()
    with_masks = ctx.mask_format == pb.RLE and (det.masks is not None or det.rle is not None)
    counts = (det.rle if det.rle is not None else rle_encode(det.masks)) if with_masks else None
    head = pb.DetectResponse(request_id=ctx.request_id, model=ctx.model, height=ctx.height, width=ctx.width)
    rle_bytes = (counts.nbytes() if isinstance(counts, RleText) else sum(len(c) for c in counts)
                 ) if counts is not None else 0
    if rle_bytes >= WIRE_FROM_BYTES:
        if isinstance(counts, RleText):
            pieces = instance_pieces(det, ctx.categories, ctx.height, ctx.width, counts.views(), counts.lengths())
        else:
            pieces = instance_pieces(det, ctx.categories, ctx.height, ctx.width, counts)
    else:
        add_instances(head, det, ctx.categories, ctx.height, ctx.width,
                      list(counts) if isinstance(counts, RleText) else counts)
        pieces = []
    t = ctx.timings
    t.encode_us = int((time.perf_counter() - t0) * 1e6)
    t.total_us = max(0, int((time.time() - ctx.received_at) * 1e6)) if ctx.received_at else 0
    tail = pb.DetectResponse(worker=ctx.worker, timing=pb.Timing(
        queued_us=t.queue_us, decode_us=t.decode_us, inference_us=t.inference_us, postprocess_us=t.encode_us,
        total_us=t.total_us, batch_size=t.batch_size))
    # Fields 1-5 (the instances through protobuf, or written here), then 6-7: protobuf's order; one join.
    return b"".join([head.SerializeToString(), *pieces, tail.SerializeToString()])
