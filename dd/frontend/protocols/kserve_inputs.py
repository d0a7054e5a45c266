"""KServe v2 ModelInferRequest -> what deep-detection's request path needs, checked (no decoding here).

One image per request (the server batches). The inputs, by name:

  color  UINT8  [H, W, 3]  RGB pixels            (a leading batch dimension of 1 is accepted)
         BYTES  [1]        an encoded image (JPEG, PNG, BMP, TIFF, WebP)
  depth  UINT16 [H, W]     millimetres           (RGB-D models only; leading 1 accepted)
         FP32   [H, W]     metres
         BYTES  [1]        an encoded 16-bit PNG or TIFF, millimetres

Tensor data comes from `raw_input_contents` (what tritonclient sends: then every input has one,
in the order of `inputs`) or from each input's typed `contents`. Requested outputs must be
among boxes, scores, classes, masks, each at most once. Request parameter `score_threshold`
(double or int64) in [0, 1]; 0 or absent: the model's own. Other request parameters are
ignored, as Triton ignores those it does not use.

Every refusal is a ServeError with INVALID_ARGUMENT (NOT_FOUND for a version the model does
not have) and a sentence that names the input and says what is allowed. Pixel and size
checks that need the image (header sizes, max_image_pixels, slot size, depth range) are the
request path's decode step, the same as for the Detector API.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from dd.frontend.errors import ServeError, Status
from dd.frontend.inputs import ENCODED, RAW, ImageInput, OutputRegion
from dd.proto.inference import grpc_service_pb2 as pb

VERSION = "1"  # every model has one version
OUTPUTS = ("boxes", "scores", "classes", "masks")
# input -> datatype -> (numpy dtype of a raw tensor, the field of InferTensorContents, what it is)
_INPUTS = {
    "color": {"UINT8": ("uint8", "uint_contents", "UINT8 [H, W, 3] (RGB pixels)"),
              "BYTES": ("", "bytes_contents", "BYTES [1] (an encoded JPEG, PNG, BMP, TIFF or WebP image)")},
    "depth": {"UINT16": ("uint16", "uint_contents", "UINT16 [H, W] (millimetres)"),
              "FP32": ("float32", "fp32_contents", "FP32 [H, W] (metres)"),
              "BYTES": ("", "bytes_contents", "BYTES [1] (an encoded 16-bit PNG or TIFF, millimetres)")},
}
# Where clients put tensors in registered shared memory (Triton's parameter names).
SHM_PARAMETERS = ("shared_memory_region", "shared_memory_offset", "shared_memory_byte_size")


def _invalid(message: str) -> ServeError:
    return ServeError(Status.INVALID_ARGUMENT, message)


def allowed(name: str) -> str:
    """The datatypes and shapes input `name` takes, as a sentence fragment."""
    return " or ".join(what for _, _, what in _INPUTS[name].values())


class ShmAccess(Protocol):
    """What parsing needs of the client shared-memory registry (dd/frontend/client_shm.py)."""

    def view(self, name: str, offset: int, byte_size: int) -> memoryview: ...

    def region(self, name: str, offset: int, byte_size: int) -> Any: ...  # .key, .offset; range checked


@dataclass
class InferInputs:
    """A ModelInferRequest, checked: what the request path needs to serve it."""

    model: str
    version: str
    request_id: str
    color: ImageInput
    depth: ImageInput | None
    score_threshold: float  # 0: the model's own
    outputs: tuple[str, ...]  # in the order asked; empty: every output
    output_regions: tuple[OutputRegion, ...] = ()  # outputs asked into client shared memory (absolute ranges)

    @property
    def wants_masks(self) -> bool:
        return not self.outputs or "masks" in self.outputs


def check_version(model: str, version: str) -> None:
    if version not in ("", VERSION):
        raise ServeError(Status.NOT_FOUND, f"model {model!r} has no version {version[:64]!r}; its one version is "
                                           f"{VERSION!r} (or leave the version empty)")


def parse_bytes_tensor(raw: bytes | memoryview, what: str) -> list[bytes]:
    """The elements of a raw BYTES tensor (each prefixed by its length, uint32 little-endian)."""
    items, i, view = [], 0, memoryview(raw)
    while i < len(view):
        if i + 4 > len(view):
            raise _invalid(f"{what}: a raw BYTES tensor must be elements each prefixed by its 4-byte length; "
                           f"{len(view) - i} byte(s) are left over at its end")
        (n,) = struct.unpack_from("<I", view, i)
        if i + 4 + n > len(view):
            raise _invalid(f"{what}: a BYTES element announces {n} bytes but only {len(view) - i - 4} follow")
        items.append(view[i + 4:i + 4 + n])
        i += 4 + n
    return items


def _threshold(request: pb.ModelInferRequest) -> float:
    if "score_threshold" not in request.parameters:
        return 0.0
    param = request.parameters["score_threshold"]
    kind = param.WhichOneof("parameter_choice")
    if kind not in ("double_param", "int64_param", "uint64_param"):
        raise _invalid(f"parameter score_threshold must be a number (double) in [0, 1], got a {kind or 'empty'} "
                       "parameter")
    value = float(getattr(param, kind))
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise _invalid(f"parameter score_threshold must be in [0, 1] (0: the model's own), got {value}")
    return value


def _outputs(request: pb.ModelInferRequest,
             shm: ShmAccess | None) -> tuple[tuple[str, ...], tuple[OutputRegion, ...]]:
    names, regions = [], []
    for out in request.outputs:
        if out.name not in OUTPUTS:
            raise _invalid(f"unknown output {out.name[:64]!r}; the outputs are {', '.join(OUTPUTS)}")
        if out.name in names:
            raise _invalid(f"output {out.name!r} is requested twice")
        where = _shm_range(out.parameters, f"output {out.name!r}", shm)
        if where is not None:
            assert shm is not None
            name, offset, size = where
            region = shm.region(name, offset, size)  # the range checked against the registration
            regions.append(OutputRegion(out.name, region.key, region.offset + offset, size))  # in the segment
        names.append(out.name)
    return tuple(names), tuple(regions)


def _shm_range(parameters, what: str, shm: ShmAccess | None) -> tuple[str, int, int] | None:
    """(region, offset, byte_size) when `parameters` name a shared-memory region, else None; refused
    when client shared memory is off."""
    used = [p for p in SHM_PARAMETERS if p in parameters]
    if not used:
        return None
    if shm is None:
        raise _invalid(f"{what} names a shared-memory region ({used[0]}), but client shared memory is off on this "
                       "server; send the tensor in the request, or start the server with --allow-client-shm")
    if "shared_memory_region" not in parameters or "shared_memory_byte_size" not in parameters:
        raise _invalid(f"{what}: a tensor in shared memory needs both shared_memory_region (string) and "
                       "shared_memory_byte_size (int64); shared_memory_offset (int64) is optional")
    region = parameters["shared_memory_region"]
    if region.WhichOneof("parameter_choice") != "string_param" or not region.string_param:
        raise _invalid(f"{what}: shared_memory_region must be the name of a registered region (a string)")
    numbers = []
    for key in ("shared_memory_offset", "shared_memory_byte_size"):
        if key not in parameters:
            numbers.append(0)
            continue
        param = parameters[key]
        kind = param.WhichOneof("parameter_choice")
        if kind not in ("int64_param", "uint64_param"):
            raise _invalid(f"{what}: {key} must be an integer (int64), got a {kind or 'empty'} parameter")
        value = int(getattr(param, kind))
        if value < 0:
            raise _invalid(f"{what}: {key} must be >= 0, got {value}")
        numbers.append(value)
    return region.string_param, numbers[0], numbers[1]


def _shape(tensor: pb.ModelInferRequest.InferInputTensor, datatype: str) -> tuple[int, ...]:
    shape = tuple(int(s) for s in tensor.shape)
    name = tensor.name
    if datatype == "BYTES":
        if shape not in ((1,), (1, 1)):
            raise _invalid(f"input {name!r}: a BYTES input holds one encoded image, shape [1]; got shape "
                           f"{list(shape)}")
        return (1,)
    if len(shape) and shape[0] == 1 and len(shape) == (4 if name == "color" else 3):
        shape = shape[1:]  # a batch of one
    if name == "depth" and len(shape) == 3 and shape[2] == 1:
        shape = shape[:2]
    want = 3 if name == "color" else 2
    if len(shape) != want or (name == "color" and shape[2] != 3) or any(s <= 0 for s in shape):
        raise _invalid(f"input {name!r}: shape {list(tensor.shape)} is not accepted; send {allowed(name)}")
    return shape


def _input(request: pb.ModelInferRequest, index: int, raw_index: int | None, shm: ShmAccess | None) -> ImageInput:
    """Input `index`; its bytes from client shared memory (a view: no copy), from
    raw_input_contents[raw_index], or from its typed contents (raw_index None)."""
    tensor = request.inputs[index]
    name = tensor.name
    types = _INPUTS[name]
    if tensor.datatype not in types:
        raise _invalid(f"input {name!r}: datatype {tensor.datatype[:32]!r} is not accepted; send {allowed(name)}")
    where = _shm_range(tensor.parameters, f"input {name!r}", shm)
    dtype, field, _ = types[tensor.datatype]
    shape = _shape(tensor, tensor.datatype)
    raw: bytes | memoryview | None = None
    if where is not None:
        assert shm is not None
        raw = shm.view(*where)  # no copy: the decode step reads the client's memory into the ring slot
    elif raw_index is not None:
        raw = request.raw_input_contents[raw_index]
    if raw is not None:
        if tensor.datatype == "BYTES":
            items = parse_bytes_tensor(raw, f"input {name!r}")
            if len(items) != 1:
                raise _invalid(f"input {name!r}: a BYTES input holds one encoded image; got {len(items)} elements")
            return ImageInput(bytes(items[0]), ENCODED)
        need = math.prod(shape) * np.dtype(dtype).itemsize
        if len(raw) != need:
            raise _invalid(f"input {name!r}: {len(raw)} bytes of raw data, but shape {list(shape)} of "
                           f"{tensor.datatype} needs {need}")
        return ImageInput(raw, RAW, shape, dtype)
    values = getattr(tensor.contents, field)
    if tensor.datatype == "BYTES":
        if len(values) != 1:
            raise _invalid(f"input {name!r}: a BYTES input holds one encoded image; got {len(values)} elements in "
                           "contents.bytes_contents")
        return ImageInput(values[0], ENCODED)
    if len(values) != math.prod(shape):
        raise _invalid(f"input {name!r}: {len(values)} values in contents.{field}, but shape {list(shape)} needs "
                       f"{math.prod(shape)} (or send the tensor in raw_input_contents)")
    array = np.asarray(values, dtype=np.float32 if dtype == "float32" else np.int64)
    if dtype != "float32" and array.size and (array.min() < 0 or array.max() > np.iinfo(dtype).max):
        raise _invalid(f"input {name!r}: {tensor.datatype} values must lie in [0, {np.iinfo(dtype).max}], got "
                       f"{array.min()} to {array.max()}")
    return ImageInput(array.astype(dtype).tobytes(), RAW, shape, dtype)


def parse_infer(request: pb.ModelInferRequest, input_kind: str, *, shm: ShmAccess | None = None) -> InferInputs:
    """The request's inputs, outputs and parameters, checked against a model of `input_kind` (rgb, rgbd).
    `shm`: the client shared-memory registry (--allow-client-shm); None: tensors in shared memory are refused."""
    check_version(request.model_name, request.model_version)
    takes = ("color", "depth") if input_kind == "rgbd" else ("color",)
    names = [t.name for t in request.inputs]
    for name in names:
        if name not in takes:
            extra = " (an RGB model takes no depth)" if name == "depth" else ""
            raise _invalid(f"unknown input {name[:64]!r}{extra}; model {request.model_name!r} takes "
                           f"{' and '.join(takes)}")
        if names.count(name) > 1:
            raise _invalid(f"input {name!r} is given twice")
    # raw_input_contents: one per input whose data is not in shared memory, in the order of inputs
    # (what tritonclient sends when some inputs are in shared memory and others are not).
    if shm is None:  # refused first, with the reason (off), before raw_input_contents are counted
        for t in request.inputs:
            _shm_range(t.parameters, f"input {t.name!r}", None)
    in_message = [i for i, t in enumerate(request.inputs) if not any(p in t.parameters for p in SHM_PARAMETERS)]
    if request.raw_input_contents and len(request.raw_input_contents) != len(in_message):
        raise _invalid(f"{len(request.raw_input_contents)} raw_input_contents for {len(in_message)} inputs not in "
                       "shared memory; when raw_input_contents is used, each such input needs one, in the order of "
                       "inputs")
    raw_index = {i: n for n, i in enumerate(in_message)} if request.raw_input_contents else {}
    if "color" not in names:
        raise _invalid(f"input 'color' is missing; send {allowed('color')}")
    if input_kind == "rgbd" and "depth" not in names:
        raise _invalid(f"model {request.model_name!r} is RGB-D and needs input 'depth'; send {allowed('depth')}")
    outputs, output_regions = _outputs(request, shm)
    color_at = names.index("color")
    color = _input(request, color_at, raw_index.get(color_at), shm)
    depth_at = names.index("depth") if "depth" in names else -1
    depth = _input(request, depth_at, raw_index.get(depth_at), shm) if depth_at >= 0 else None
    return InferInputs(request.model_name, request.model_version or VERSION, request.id, color, depth,
                       _threshold(request), outputs, output_regions)
