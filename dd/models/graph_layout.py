"""The contract between an exported Mask R-CNN graph and the engines that run it.

`deep-detection export` (dd.export) writes a graph and this contract beside it
(`export.json`); the onnxruntime and tensorrt engines read the contract and feed
the graph exactly what it was traced with. Both graph flavours share one output
layout, that of NVIDIA's TensorRT detectron2 sample (EfficientNMS_TRT's outputs
plus the mask head's), so one decoder serves both engines:

- ``num_detections_box_outputs``   [B, 1] int32: valid rows per image;
- ``detection_boxes_box_outputs``  [B, N, 4] float32: x1, y1, x2, y2 divided by the input's
  width and height (the padded canvas), valid in the first num_detections rows;
- ``detection_scores_box_outputs`` [B, N] float32;
- ``detection_classes_box_outputs`` [B, N] int32: 0-based category index;
- ``detection_masks``              [B, N, M, M] float32: the detection's own class's mask
  probabilities (M = 28), to be pasted into its box.

Inputs: ``input_tensor`` [B, C, H, W] float32 (resized, normalised, zero-padded on the
bottom and right to the canvas H x W), ``image_size`` [B, 2] float32 (height and width of
the resized image inside the canvas: boxes are clipped to it, as the source model clips them)
and, for plain ONNX graphs, ``score_threshold`` [1] float32 (detections must score above it;
the TensorRT flavour bakes it into EfficientNMS_TRT).

Plain data and JSON: no torch, onnx or tensorrt import.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CONTRACT_FILE = "export.json"
INPUT = "input_tensor"
IMAGE_SIZE = "image_size"
SCORE_THRESHOLD = "score_threshold"
NUM_DETECTIONS = "num_detections_box_outputs"
BOXES = "detection_boxes_box_outputs"
SCORES = "detection_scores_box_outputs"
CLASSES = "detection_classes_box_outputs"
MASKS = "detection_masks"
OUTPUTS = (NUM_DETECTIONS, BOXES, SCORES, CLASSES, MASKS)
FORMATS = ("onnx", "tensorrt-onnx")


@dataclass
class GraphContract:
    """What an engine must do around an exported graph to answer as the source model does.

    semantics: "torchvision" or "detectron2" (dd.models.semantics): the resize rule (floor vs
    half-up rounding, PIL's antialiased bilinear for detectron2's uint8 RGB), the threshold
    comparison (>= vs >), the mask paste rule, and how boxes go back to the input image.
    Normalisation: x' = (x * input_scale - mean) / std per channel, R, G, B (then depth in metres),
    input_scale 1/255 for torchvision weights (mean/std in [0, 1]) and 1 for detectron2's (0-255).
    """

    format: str  # "onnx" or "tensorrt-onnx"
    semantics: str
    batch: int
    height: int
    width: int
    channels: int
    min_size: int
    max_size: int
    input_scale: float
    mean: list[float]
    std: list[float]
    depth_fill_m: float | None  # missing depth (0) becomes this before normalisation; None keeps 0
    max_detections: int
    mask_size: int
    score_threshold: float  # baked into the tensorrt flavour; the default request threshold otherwise
    score_threshold_input: bool
    dynamic_batch: bool = False
    num_classes: int = 0  # categories (without the background)
    opset: int = 17
    source: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def read(cls, folder: Path) -> "GraphContract":
        path = Path(folder) / CONTRACT_FILE
        if not path.is_file():
            raise ValueError(f"{path}: missing; an exported model folder holds the {CONTRACT_FILE} written by "
                             "`deep-detection export` beside its graph (export the model again)")
        try:
            raw = json.loads(path.read_text())
            out = cls(**raw)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"{path}: not an export contract ({exc}); export the model again") from exc
        if out.format not in FORMATS:
            raise ValueError(f"{path}: format {out.format!r} is not one of {FORMATS}")
        if out.semantics not in ("torchvision", "detectron2"):
            raise ValueError(f"{path}: semantics {out.semantics!r} is not 'torchvision' or 'detectron2'")
        if len(out.mean) != out.channels or len(out.std) != out.channels:
            raise ValueError(f"{path}: mean and std need {out.channels} values each")
        return out
