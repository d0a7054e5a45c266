"""kserve_v2: an engine's Detections -> the serialized inference.ModelInferResponse (KServe v2 / Triton).

Built and serialized in the worker, like detector_v1, so the frontend forwards the bytes.
Tensors go in `raw_output_contents` (little-endian, row-major; BYTES elements each prefixed
by their length as a little-endian uint32), which is what NVIDIA's tritonclient reads; only
the outputs the request named, in the order it named them (none named: all four).

  boxes    FP32   [N, 4]  x1, y1, x2, y2 in pixels of the input
  scores   FP32   [N]
  classes  INT32  [N]     1-based, as class_id in the Detector API
  masks    BYTES  [N]     COCO compressed RLE counts of the full-image mask

An output the request asked for in client shared memory (ctx.output_sink) is written there
instead; the response keeps its name, datatype and shape, its parameter
`shared_memory_byte_size` says how many bytes were written, and its raw contents are empty.

The response's parameters `height` and `width` (int64) give the masks' size, which COCO's
RLE needs to decode them.
"""

from __future__ import annotations

import struct
import time
from typing import Sequence

import numpy as np

from dd.proto.inference import grpc_service_pb2 as pb
from dd.worker.encoders import EncodeContext
from dd.worker.encoders.detector_v1 import rle_encode
from dd.worker.engines.base import Detections, RleText

# name -> datatype, in the order of a response that names none.
OUTPUTS: dict[str, str] = {"boxes": "FP32", "scores": "FP32", "classes": "INT32", "masks": "BYTES"}
DEFAULT_VERSION = "1"


def bytes_tensor(items: Sequence[bytes]) -> bytes:
    """A KServe v2 raw BYTES tensor: each element prefixed by its length (uint32, little-endian).
    An engine's RLE strings in one buffer (RleText: the fast engine's, hundreds of KB) are joined
    straight from it with their prefixes, one copy, rather than copied out one by one and again with
    each prefix."""
    if isinstance(items, RleText):
        n = len(items)
        prefixes = memoryview(items.lengths().astype("<u4").tobytes())
        pieces: list[bytes | memoryview] = [b""] * (2 * n)
        pieces[0::2] = [prefixes[4 * i:4 * i + 4] for i in range(n)]
        pieces[1::2] = items.views()
        return b"".join(pieces)
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _tensor(name: str, det: Detections) -> tuple[list[int], bytes]:
    n = len(det.scores)
    if name == "boxes":
        return [n, 4], np.ascontiguousarray(det.boxes, dtype="<f4").reshape(n, 4).tobytes()
    if name == "scores":
        return [n], np.ascontiguousarray(det.scores, dtype="<f4").tobytes()
    if name == "classes":
        return [n], np.ascontiguousarray(det.labels, dtype="<i4").tobytes()
    if name == "masks":
        if det.rle is not None:
            counts = det.rle
        elif det.masks is not None:
            counts = rle_encode(det.masks)
        else:
            raise ValueError("masks were requested but the engine computed none")
        return [n], bytes_tensor(counts)
    raise ValueError(f"unknown output {name!r}; the outputs are {', '.join(OUTPUTS)}")


def build_response(det: Detections, ctx: EncodeContext) -> pb.ModelInferResponse:
    resp = pb.ModelInferResponse(model_name=ctx.model, model_version=ctx.model_version or DEFAULT_VERSION,
                                 id=ctx.request_id)
    resp.parameters["height"].int64_param = ctx.height
    resp.parameters["width"].int64_param = ctx.width
    sink = ctx.output_sink
    for name in ctx.outputs or tuple(OUTPUTS):
        shape, raw = _tensor(name, det)
        out = resp.outputs.add(name=name, datatype=OUTPUTS[name], shape=shape)
        if sink is not None and name in sink:
            # In the client's shared memory, as Triton does: the response keeps the output's name,
            # datatype and shape, and says how many bytes were written; its raw contents stay empty.
            out.parameters["shared_memory_byte_size"].int64_param = sink.write(name, raw)
            raw = b""
        resp.raw_output_contents.append(raw)
    return resp


def encode(det: Detections, ctx: EncodeContext) -> bytes:
    """The response's bytes; fills in the encoding and end-to-end times of ctx.timings."""
    t0 = time.perf_counter()
    body = build_response(det, ctx).SerializeToString()
    ctx.timings.encode_us = int((time.perf_counter() - t0) * 1e6)
    ctx.timings.total_us = max(0, int((time.time() - ctx.received_at) * 1e6)) if ctx.received_at else 0
    return body
