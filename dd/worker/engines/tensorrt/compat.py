"""Which TensorRT and GPU an engine was built for, compared with this machine's.

A serialized engine runs only on the TensorRT version that built it (unless built
version-compatible) and on GPUs of the same compute capability (unless built
hardware-compatible). build_engine.sh (written by the export) records both beside the
engine (`model.engine.json`); this module compares that record with the running
TensorRT and GPU, and words the errors: a mismatch is logged at load, and a failed
deserialisation names both sides and how to rebuild.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BUILD_INFO_SUFFIX = ".json"


def read_build_info(engine_path: Path | str) -> dict[str, Any] | None:
    """The record build_engine.sh wrote beside an engine (model.engine -> model.engine.json), if any."""
    path = Path(str(engine_path) + BUILD_INFO_SUFFIX)
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    return info if isinstance(info, dict) else None


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def mismatches(info: dict[str, Any] | None, trt_version: str, gpu_name: str, capability: str) -> list[str]:
    """What differs between the build record and this machine: an empty list when nothing does (or no record)."""
    if not info:
        return []
    out = []
    built = str(info.get("tensorrt_version", ""))
    if built and _major_minor(built) != _major_minor(trt_version):
        out.append(f"built with TensorRT {built}, this is TensorRT {trt_version}")
    cap = str(info.get("compute_capability", ""))
    if cap and cap != capability:
        out.append(f"built on a GPU of compute capability {cap} ({info.get('gpu_name', '?')}), this GPU is "
                   f"{capability} ({gpu_name})")
    elif info.get("gpu_name") and info.get("gpu_name") != gpu_name:
        out.append(f"built on {info['gpu_name']}, this GPU is {gpu_name} (same compute capability: it may run, "
                   "with the other GPU's tactics)")
    return out


def load_failure(engine_path: Path | str, info: dict[str, Any] | None, trt_version: str, gpu_name: str,
                 capability: str, logged: list[str]) -> str:
    """The error for an engine TensorRT could not deserialize: TensorRT's own words, both sides, what to do."""
    built = (f"built with TensorRT {info.get('tensorrt_version', '?')} on {info.get('gpu_name', '?')} "
             f"(compute capability {info.get('compute_capability', '?')}) per {engine_path}{BUILD_INFO_SUFFIX}"
             if info else f"no build record ({engine_path}{BUILD_INFO_SUFFIX} is missing)")
    said = "; ".join(logged[-3:]) or "no message"
    return (f"{engine_path}: TensorRT {trt_version} on {gpu_name} (compute capability {capability}) could not "
            f"deserialize the engine ({said}); it was {built}. An engine runs on the TensorRT version and GPU "
            "type that built it: rebuild it here with build_engine.sh beside it (docs/tensorrt.md)")
