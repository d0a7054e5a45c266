"""TensorRT's Python API around one engine: imported lazily, deserialised, run on a torch CUDA stream."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from dd.worker.engines.tensorrt.bindings import TensorSpec, bind, read_specs
from dd.worker.engines.tensorrt.compat import load_failure, mismatches, read_build_info

log = logging.getLogger(__name__)


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise RuntimeError("engine tensorrt needs NVIDIA TensorRT's Python package (pip install tensorrt, or "
                           "NVIDIA's container), of the version that built the engine, on a machine with a CUDA "
                           "GPU; without it, serve the --format onnx export with ENGINE onnxruntime") from None
    return tensorrt


class TrtRunner:
    """One deserialised engine and its execution context on the current CUDA device."""

    def __init__(self, engine_path: Path, device: torch.device) -> None:
        trt = import_tensorrt()
        self.trt, self.device = trt, device
        messages: list[str] = []

        class _Logger(trt.ILogger):  # keeps TensorRT's errors for our own message
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:  # noqa: A003 - TensorRT's interface
                if int(severity) <= int(trt.ILogger.Severity.WARNING):  # errors and warnings
                    messages.append(msg)
                    log.warning("TensorRT: %s", msg)

        self.logger = _Logger()
        trt.init_libnvinfer_plugins(self.logger, "")  # EfficientNMS_TRT, PyramidROIAlign_TRT
        gpu = torch.cuda.get_device_name(device)
        cap = "%d.%d" % torch.cuda.get_device_capability(device)
        info = read_build_info(engine_path)
        for problem in mismatches(info, trt.__version__, gpu, cap):
            log.warning("%s: %s", engine_path, problem)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(load_failure(engine_path, info, trt.__version__, gpu, cap, messages))
        self.context = self.engine.create_execution_context()
        self.specs: list[TensorSpec] = read_specs(self.engine)
        self.stream = torch.cuda.Stream(device=device)

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Runs once on the runner's stream; returns the outputs (on the GPU) once they are ready."""
        with torch.cuda.stream(self.stream):
            buffers = bind(self.context, self.specs, feeds, self.device)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT's execute_async_v3 failed (see the log for TensorRT's message)")
        self.stream.synchronize()
        return {k: v for k, v in buffers.items() if not k.startswith("__input__")}
