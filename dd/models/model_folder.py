"""Writing model folders in the users' format: node_config.json beside weights and categories.

Used by the training script for the demo models and by the tests, which need a
real model folder with known weights to compare served against in-process results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dd.config import DEFAULT_ARCHITECTURE
from dd.models.maskrcnn import build_maskrcnn

# Small enough for a CPU and for shipping in the repository (fp16 weights of a few MB).
SMALL_ARCHITECTURE: dict[str, Any] = dict(DEFAULT_ARCHITECTURE, backbone="mobilenet_v3_large", fpn_channels=64,
                                          box_head_dim=256, mask_head_channels=64, mask_head_layers=2,
                                          max_detections=50)


def write_model_folder(folder: Path, state_dict: dict[str, torch.Tensor], *, input_kind: str,
                       categories: list[str], architecture: dict[str, Any], min_size: int, max_size: int,
                       score_threshold: float, half: bool = True, extra: dict[str, Any] | None = None) -> Path:
    """Writes weights (fp16 by default, to stay small), categories.txt and node_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}
    torch.save(weights, folder / "model.pth")
    (folder / "categories.txt").write_text("\n".join(categories) + "\n")
    cfg: dict[str, Any] = {
        "DETECTION_TYPE": "RGBDMaskRCNNTorchServicer" if input_kind == "rgbd" else "RGBMaskRCNNTorchServicer",
        "MODEL_WEIGHT": "model.pth",
        "CATEGORY_FILE": "categories.txt",
        "MIN_SIZE": min_size,
        "MAX_SIZE": max_size,
        "SCORE_THRESH_TEST": score_threshold,
        "ARCHITECTURE": {k: v for k, v in architecture.items() if DEFAULT_ARCHITECTURE.get(k) != v},
    }
    cfg.update(extra or {})
    (folder / "node_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def random_model_folder(folder: Path, *, input_kind: str = "rgbd", seed: int = 0, categories: list[str] | None = None,
                        architecture: dict[str, Any] | None = None, min_size: int = 256, max_size: int = 512,
                        score_threshold: float = 0.3, extra: dict[str, Any] | None = None) -> Path:
    """A model folder with fixed random weights: real computation, meaningless answers.

    Random weights give near-uniform class scores, so the default threshold
    still lets instances through for the serving tests to compare. Weights are
    rounded to fp16 before the folder is written, so in-process and served
    models hold the very same numbers.
    """
    categories = categories or ["carton"]
    arch = architecture or SMALL_ARCHITECTURE
    torch.manual_seed(seed)
    channels = 4 if input_kind == "rgbd" else 3
    model = build_maskrcnn(arch, len(categories) + 1, channels, min_size, max_size, [0.5] * channels, [0.25] * channels)
    state = {k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    return write_model_folder(folder, state, input_kind=input_kind, categories=categories, architecture=arch,
                              min_size=min_size, max_size=max_size, score_threshold=score_threshold, extra=extra)
