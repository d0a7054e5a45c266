"""ONNX Runtime sessions: the package imported lazily, options validated, the provider chosen by device.

ENGINE_OPTIONS for `onnxruntime`:
- ``provider``: "auto" (CUDA where the worker has a GPU and onnxruntime-gpu provides
  CUDAExecutionProvider, else the CPU, with a log line saying which and why), "cuda" (an
  error where it cannot run) or "cpu";
- ``intra_op_threads``: threads per operator (0: ONNX Runtime's default, all cores);
- ``graph_optimization``: "all" (default), "extended", "basic" or "disable".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

PROVIDERS = ("auto", "cuda", "cpu")
OPTIMIZATIONS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC",
                 "disable": "ORT_DISABLE_ALL"}


class OptionError(ValueError):
    """An ENGINE_OPTIONS value the engine cannot use; the message names the key and what is allowed."""


@dataclass(frozen=True)
class OrtOptions:
    provider: str = "auto"
    intra_op_threads: int = 0
    graph_optimization: str = "all"

    @classmethod
    def parse(cls, raw: dict[str, Any], where: str = "ENGINE_OPTIONS") -> "OrtOptions":
        allowed = {"provider", "intra_op_threads", "graph_optimization"}
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise OptionError(f"{where}: unknown option(s) {unknown} for engine onnxruntime; allowed: "
                              f"{sorted(allowed)}")
        provider = raw.get("provider", "auto")
        if provider not in PROVIDERS:
            raise OptionError(f"{where}: provider must be one of {PROVIDERS}, got {provider!r}")
        threads = raw.get("intra_op_threads", 0)
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
            raise OptionError(f"{where}: intra_op_threads must be an integer >= 0 (0: all cores), got {threads!r}")
        opt = raw.get("graph_optimization", "all")
        if opt not in OPTIMIZATIONS:
            raise OptionError(f"{where}: graph_optimization must be one of {sorted(OPTIMIZATIONS)}, got {opt!r}")
        return cls(provider, threads, opt)


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeError("engine onnxruntime needs the onnxruntime package: pip install onnxruntime "
                           "(CPU) or pip install onnxruntime-gpu (CUDA), or pip install 'deep-detection[onnx]'") from None
    return onnxruntime


def choose_providers(available: list[str], device: str, provider: str) -> tuple[list[Any], str]:
    """The providers list for InferenceSession and a sentence saying why (logged by the engine)."""
    on_gpu = device.startswith("cuda")
    index = int(device.split(":")[1]) if on_gpu and ":" in device else 0
    has_cuda = "CUDAExecutionProvider" in available
    if provider == "cpu":
        return ["CPUExecutionProvider"], "CPUExecutionProvider (ENGINE_OPTIONS provider: cpu)"
    if provider == "cuda":
        if not has_cuda:
            raise RuntimeError("ENGINE_OPTIONS provider 'cuda': this onnxruntime has no CUDAExecutionProvider "
                               f"(it has {available}); pip install onnxruntime-gpu")
        if not on_gpu:
            raise RuntimeError(f"ENGINE_OPTIONS provider 'cuda': this worker runs on {device}, not a GPU")
    if on_gpu and has_cuda:
        return ([("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"],
                f"CUDAExecutionProvider on GPU {index}")
    if on_gpu:
        return ["CPUExecutionProvider"], (f"CPUExecutionProvider: the worker has {device} but this onnxruntime has no "
                                          "CUDAExecutionProvider (pip install onnxruntime-gpu)")
    return ["CPUExecutionProvider"], "CPUExecutionProvider (no GPU for this worker)"


def open_session(path: str, device: str, options: OrtOptions) -> tuple[Any, str]:
    ort = import_onnxruntime()
    providers, why = choose_providers(list(ort.get_available_providers()), device, options.provider)
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATIONS[options.graph_optimization])
    so.log_severity_level = 3  # errors only: ONNX Runtime warns about every unused initializer otherwise
    return ort.InferenceSession(path, so, providers=providers), why
