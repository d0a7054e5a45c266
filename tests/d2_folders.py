"""detectron2-format model folders for tests, written without detectron2.

`d2_state_dict` lays out random weights exactly as detectron2's GeneralizedRCNN names
and shapes them (written here from detectron2's module definitions, independently of
dd.models.detectron2.convert, so that the converter is tested against it);
`write_d2_folder` writes a users'-style folder: the YAML, the weights in one of
the containers users have, categories.txt and a node_config.json with the seed's keys only.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Any

import torch
import yaml

from dd.models.detectron2.config import BLOCKS_PER_STAGE, Detectron2Spec, read_detectron2_yaml

# A narrow ResNet-50-FPN Mask R-CNN: every part of the real one, cheap on a CPU.
SMALL_YAML: dict[str, Any] = {
    "MODEL": {
        "META_ARCHITECTURE": "GeneralizedRCNN", "MASK_ON": True,
        "BACKBONE": {"NAME": "build_resnet_fpn_backbone"},
        "RESNETS": {"DEPTH": 50, "OUT_FEATURES": ["res2", "res3", "res4", "res5"], "WIDTH_PER_GROUP": 4,
                    "RES2_OUT_CHANNELS": 16, "STEM_OUT_CHANNELS": 8},
        "FPN": {"IN_FEATURES": ["res2", "res3", "res4", "res5"], "OUT_CHANNELS": 16},
        "ANCHOR_GENERATOR": {"SIZES": [[32], [64], [128], [256], [512]], "ASPECT_RATIOS": [[0.5, 1.0, 2.0]]},
        "RPN": {"IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"], "PRE_NMS_TOPK_TEST": 300, "POST_NMS_TOPK_TEST": 100},
        "ROI_HEADS": {"NAME": "StandardROIHeads", "IN_FEATURES": ["p2", "p3", "p4", "p5"], "NUM_CLASSES": 2},
        "ROI_BOX_HEAD": {"NAME": "FastRCNNConvFCHead", "NUM_FC": 2, "FC_DIM": 32, "POOLER_RESOLUTION": 7},
        "ROI_MASK_HEAD": {"NAME": "MaskRCNNConvUpsampleHead", "NUM_CONV": 2, "CONV_DIM": 16},
    },
    "INPUT": {"MIN_SIZE_TEST": 160, "MAX_SIZE_TEST": 320},
    "TEST": {"DETECTIONS_PER_IMAGE": 20},
    "VERSION": 2,
}
RGBD_MEAN_STD = {"PIXEL_MEAN": [103.53, 116.28, 123.675, 2.0], "PIXEL_STD": [57.375, 57.12, 58.395, 0.5]}


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(base))
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def d2_state_dict(spec: Detectron2Spec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under detectron2's parameter names and shapes for the network `spec` describes."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    def conv(name: str, cout: int, cin: int, k: int, bias: bool = False, groups: int = 1, gain: float = 1.0) -> None:
        sd[f"{name}.weight"] = randn(cout, cin // groups, k, k) * gain * math.sqrt(2.0 / (cin // groups * k * k))
        if bias:
            sd[f"{name}.bias"] = randn(cout) * 0.1

    def norm(name: str, c: int, gain: float = 1.0) -> None:
        sd[f"{name}.weight"] = gain * (1.0 + 0.1 * randn(c))
        sd[f"{name}.bias"] = 0.1 * randn(c)
        sd[f"{name}.running_mean"] = 0.1 * randn(c)
        sd[f"{name}.running_var"] = 1.0 + 0.1 * torch.rand(c, generator=g)

    def linear(name: str, cout: int, cin: int, gain: float = 1.0) -> None:
        sd[f"{name}.weight"] = randn(cout, cin) * gain / math.sqrt(cin)
        sd[f"{name}.bias"] = randn(cout) * 0.1

    conv("backbone.bottom_up.stem.conv1", spec.stem_out_channels, spec.channels, 7)
    norm("backbone.bottom_up.stem.conv1.norm", spec.stem_out_channels)
    cin, cout = spec.stem_out_channels, spec.res2_out_channels
    width = spec.num_groups * spec.width_per_group
    out_channels = {}
    for stage, blocks in zip(range(2, 6), BLOCKS_PER_STAGE[spec.depth]):
        for b in range(blocks):
            p = f"backbone.bottom_up.res{stage}.{b}"
            if cin != cout:
                conv(f"{p}.shortcut", cout, cin, 1)
                norm(f"{p}.shortcut.norm", cout, 0.7)
            if spec.depth in (18, 34):
                conv(f"{p}.conv1", cout, cin, 3)
                norm(f"{p}.conv1.norm", cout)
                conv(f"{p}.conv2", cout, cout, 3)
                norm(f"{p}.conv2.norm", cout, 0.3)  # a residual branch's last norm: activations stay bounded
            else:
                conv(f"{p}.conv1", width, cin, 1)
                norm(f"{p}.conv1.norm", width)
                conv(f"{p}.conv2", width, width, 3, groups=spec.num_groups)
                norm(f"{p}.conv2.norm", width)
                conv(f"{p}.conv3", cout, width, 1)
                norm(f"{p}.conv3.norm", cout, 0.3)
            cin = cout
        out_channels[f"res{stage}"] = cout
        cout, width = cout * 2, width * 2
    f = spec.fpn_out_channels
    for feature in spec.fpn_in_features:
        k = feature[3:]
        conv(f"backbone.fpn_lateral{k}", f, out_channels[feature], 1, bias=True, gain=0.2)
        conv(f"backbone.fpn_output{k}", f, f, 3, bias=True, gain=0.2)
    anchors = len(spec.anchor_sizes[0]) * len(spec.anchor_aspect_ratios[0])
    conv("proposal_generator.rpn_head.conv", f, f, 3, bias=True)
    conv("proposal_generator.rpn_head.objectness_logits", anchors, f, 1, bias=True)
    conv("proposal_generator.rpn_head.anchor_deltas", 4 * anchors, f, 1, bias=True)
    sd["proposal_generator.rpn_head.anchor_deltas.weight"] *= 0.1
    res, prev = spec.box_pooler_resolution, f
    for k in range(spec.box_num_conv):
        conv(f"roi_heads.box_head.conv{k + 1}", spec.box_conv_dim, prev, 3, bias=True)
        prev = spec.box_conv_dim
    prev *= res * res
    for k in range(spec.box_num_fc):
        linear(f"roi_heads.box_head.fc{k + 1}", spec.box_fc_dim, prev)
        prev = spec.box_fc_dim
    n = spec.num_classes
    linear("roi_heads.box_predictor.cls_score", n + 1, prev, gain=2.0)
    linear("roi_heads.box_predictor.bbox_pred", 4 if spec.cls_agnostic_bbox_reg else 4 * n, prev, gain=0.1)
    prev = f
    for k in range(spec.mask_num_conv):
        conv(f"roi_heads.mask_head.mask_fcn{k + 1}", spec.mask_conv_dim, prev, 3, bias=True)
        prev = spec.mask_conv_dim
    sd["roi_heads.mask_head.deconv.weight"] = randn(prev, spec.mask_conv_dim, 2, 2) / math.sqrt(prev)  # ConvTranspose2d
    sd["roi_heads.mask_head.deconv.bias"] = 0.1 * randn(spec.mask_conv_dim)
    conv("roi_heads.mask_head.predictor", 1 if spec.cls_agnostic_mask else n, spec.mask_conv_dim, 1, bias=True)
    return sd


def save_weights(path: Path, state: dict[str, torch.Tensor], container: str) -> None:
    """container: 'trainer' (DetectionCheckpointer's layout), 'bare', 'wrapped' ({'model': ...}),
    'zoo' (a model-zoo .pkl of numpy arrays), 'legacy' (torch's pre-zip format)."""
    if container == "trainer":
        torch.save({"model": state, "trainer": {"iteration": 2499, "hooks": {"LRScheduler": {"base_lrs": [0.01]}}},
                    "iteration": 2499}, path)
    elif container == "bare":
        torch.save(state, path)
    elif container == "wrapped":
        torch.save({"model": state}, path)
    elif container == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    elif container == "zoo":
        with open(path, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "Detectron2 Model Zoo"}, f)
    else:
        raise ValueError(container)


def write_d2_folder(folder: Path, *, kind: str = "rgb", yaml_over: dict[str, Any] | None = None,
                    container: str = "trainer", seed: int = 0, categories: list[str] | None = None,
                    node: dict[str, Any] | None = None, weights_name: str = "model_final.pth") -> Path:
    """A users'-style detectron2 folder: YAML, weights, categories.txt, node_config.json (seed keys only)."""
    folder.mkdir(parents=True, exist_ok=True)
    doc = merged(SMALL_YAML, {"MODEL": RGBD_MEAN_STD} if kind == "rgbd" else {})
    doc = merged(doc, yaml_over or {})
    (folder / "config.yaml").write_text(yaml.safe_dump(doc))
    spec = read_detectron2_yaml(folder / "config.yaml")
    save_weights(folder / weights_name, d2_state_dict(spec, seed), container)
    cats = categories or [f"class{i}" for i in range(spec.num_classes)]
    (folder / "categories.txt").write_text("".join(c + "\n" for c in cats))
    cfg = {"DETECTION_TYPE": "RGBDMaskRCNNTorchServicer" if kind == "rgbd" else "RGBMaskRCNNTorchServicer",
           "MODEL_WEIGHT": weights_name, "CONFIG_FILE": "config.yaml", "CATEGORY_FILE": "categories.txt"}
    cfg.update(node or {})
    (folder / "node_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return folder
