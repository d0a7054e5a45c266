"""An engine's I/O tensors, read through TensorRT's tensor API, and the buffers for one run.

Written against the documented API (ICudaEngine.num_io_tensors, get_tensor_name,
get_tensor_mode, get_tensor_shape, get_tensor_dtype; IExecutionContext.set_input_shape,
get_tensor_shape, set_tensor_address). Nothing here imports tensorrt: the engine and
context are whatever objects offer those methods, so the tests drive this logic with a
stand-in engine (the real one needs TensorRT and a GPU, which no test machine has).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

# TensorRT DataType names -> torch dtypes (buffers are torch tensors on the worker's GPU).
DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
          "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    is_input: bool
    shape: tuple[int, ...]  # -1 where dynamic
    dtype: torch.dtype


def _mode_is_input(mode: Any) -> bool:
    name = getattr(mode, "name", str(mode))
    if name.endswith("INPUT"):
        return True
    if name.endswith("OUTPUT"):
        return False
    raise ValueError(f"tensor mode {mode!r} is neither INPUT nor OUTPUT")


def read_specs(engine: Any) -> list[TensorSpec]:
    """Every I/O tensor of a deserialized engine, in the engine's order."""
    specs = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = engine.get_tensor_dtype(name)
        dname = getattr(dtype, "name", str(dtype).split(".")[-1])
        if dname not in DTYPES:
            raise ValueError(f"engine tensor {name!r} has type {dname}, which this engine cannot buffer "
                             f"(supported: {', '.join(DTYPES)})")
        specs.append(TensorSpec(name, _mode_is_input(engine.get_tensor_mode(name)),
                                tuple(int(d) for d in engine.get_tensor_shape(name)), DTYPES[dname]))
    return specs


def check_io(specs: Sequence[TensorSpec], inputs: Sequence[str], outputs: Sequence[str], where: str) -> None:
    """The engine's tensors must be the export's: the error lists what differs."""
    have_in = sorted(s.name for s in specs if s.is_input)
    have_out = sorted(s.name for s in specs if not s.is_input)
    if have_in != sorted(inputs) or have_out != sorted(outputs):
        raise ValueError(f"{where}: the engine's inputs {have_in} and outputs {have_out} are not the export's "
                         f"({sorted(inputs)}; {sorted(outputs)}): build it from a --format tensorrt-onnx export")


def bind(context: Any, specs: Sequence[TensorSpec], feeds: dict[str, torch.Tensor],
         device: torch.device) -> dict[str, torch.Tensor]:
    """Sets the inputs' shapes and addresses, allocates the outputs at the shapes the context then reports, and
    sets their addresses. Returns the output buffers by name. Inputs are cast and made contiguous as needed."""
    keep: dict[str, torch.Tensor] = {}
    for s in specs:
        if not s.is_input:
            continue
        if s.name not in feeds:
            raise ValueError(f"no value for the engine's input {s.name!r}")
        x = feeds[s.name].to(device=device, dtype=s.dtype).contiguous()
        if len(x.shape) != len(s.shape) or any(d != -1 and d != v for d, v in zip(s.shape, x.shape)):
            raise ValueError(f"input {s.name!r} is {tuple(x.shape)}; the engine takes {s.shape} (-1: any)")
        if any(d == -1 for d in s.shape):
            context.set_input_shape(s.name, tuple(x.shape))
        context.set_tensor_address(s.name, x.data_ptr())
        keep[s.name] = x
    outputs = {}
    for s in specs:
        if s.is_input:
            continue
        shape = tuple(int(d) for d in context.get_tensor_shape(s.name))
        if any(d < 0 for d in shape):
            raise ValueError(f"output {s.name!r} has no definite shape {shape} after the inputs' shapes were set")
        out = torch.empty(shape, dtype=s.dtype, device=device)
        context.set_tensor_address(s.name, out.data_ptr())
        outputs[s.name] = out
    outputs.update({f"__input__{k}": v for k, v in keep.items()})  # alive until the run is done
    return outputs
