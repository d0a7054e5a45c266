"""detectron2 Mask R-CNN parameters renamed and laid out as torchvision's (network.py's modules).

Renaming: ``backbone.bottom_up.stem/res2..res5`` -> ``backbone.body.conv1/bn1/layer1..4``
(``conv{k}.norm`` -> ``bn{k}``, ``shortcut`` -> ``downsample.0/1``); ``backbone.fpn_lateral{k}`` /
``fpn_output{k}`` -> ``backbone.fpn.inner_blocks.{i}.0`` / ``layer_blocks.{i}.0``;
``proposal_generator.rpn_head.*`` -> ``rpn.head.*``; the box head's ``conv{k}``/``fc{k}``, the mask
head's ``mask_fcn{k}``/``deconv``/``predictor``.

Layouts that differ:
- the class scores: detectron2 puts the background last, torchvision first (rows rotated);
- box regression: detectron2 predicts K class boxes (or one, class-agnostic), torchvision K + 1 with
  the background's first (its rows are zeros here: never read) or one per class for agnostic;
- mask logits: likewise a zero background channel first (or the agnostic mask for every class);
- INPUT.FORMAT BGR: the stem's first three input channels are reversed, so that the network takes
  R, G, B (then D) like every other engine here.

Every shape is checked against the network the YAML describes, and a mismatch names the
checkpoint's key, both shapes and the YAML keys to check.
"""

from __future__ import annotations

import re
import torch

from dd.models.detectron2.checkpoint import WeightsError
from dd.models.detectron2.config import Detectron2Spec

_NORM_PARTS = ("weight", "bias", "running_mean", "running_var")
# Where to look when a converted tensor does not fit: torchvision key prefix -> YAML keys.
_HINTS = (
    ("backbone.body.conv1.", "MODEL.PIXEL_MEAN (input channels), MODEL.RESNETS.STEM_OUT_CHANNELS"),
    ("backbone.body.bn1.", "MODEL.RESNETS.STEM_OUT_CHANNELS"),
    ("backbone.body.", "MODEL.RESNETS.DEPTH, RES2_OUT_CHANNELS, NUM_GROUPS, WIDTH_PER_GROUP, STEM_OUT_CHANNELS"),
    ("backbone.fpn.", "MODEL.FPN.OUT_CHANNELS, MODEL.FPN.IN_FEATURES"),
    ("rpn.head.", "MODEL.ANCHOR_GENERATOR.SIZES, ASPECT_RATIOS (anchors per location), MODEL.FPN.OUT_CHANNELS"),
    ("roi_heads.box_head.", "MODEL.ROI_BOX_HEAD.NUM_CONV, CONV_DIM, NUM_FC, FC_DIM, POOLER_RESOLUTION"),
    ("roi_heads.box_predictor.", "MODEL.ROI_HEADS.NUM_CLASSES (and CATEGORY_FILE), "
                                 "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG, FC_DIM"),
    ("roi_heads.mask_head.", "MODEL.ROI_MASK_HEAD.NUM_CONV, CONV_DIM"),
    ("roi_heads.mask_predictor.", "MODEL.ROI_HEADS.NUM_CLASSES, MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK, CONV_DIM"),
)
# detectron2 keys that hold no weights of this network (buffers older versions saved).
_IGNORED = re.compile(r"^(pixel_mean|pixel_std|proposal_generator\.anchor_generator\..*|.*num_batches_tracked)$")


def hint(tv_key: str) -> str:
    for prefix, keys in _HINTS:
        if tv_key.startswith(prefix):
            return keys
    return "the YAML (CONFIG_FILE)"


def _stage_blocks(key: str) -> str | None:
    """backbone.bottom_up.res{s}.{b}.{rest} -> backbone.body.layer{s-1}.{b}.{rest renamed}."""
    m = re.match(r"^backbone\.bottom_up\.res([2-5])\.(\d+)\.(.+)$", key)
    if not m:
        return None
    stage, block, rest = int(m.group(1)), m.group(2), m.group(3)
    prefix = f"backbone.body.layer{stage - 1}.{block}."
    m2 = re.match(r"^conv(\d)\.(weight|norm\.(\w+))$", rest)
    if m2:
        k = m2.group(1)
        return prefix + (f"conv{k}.weight" if m2.group(2) == "weight" else f"bn{k}.{m2.group(3)}")
    m2 = re.match(r"^shortcut\.(weight|norm\.(\w+))$", rest)
    if m2:
        return prefix + ("downsample.0.weight" if m2.group(1) == "weight" else f"downsample.1.{m2.group(2)}")
    return None


def rename(key: str, spec: Detectron2Spec) -> str | None:
    """The torchvision-structured name of one detectron2 parameter, or None when it has none."""
    if key == "backbone.bottom_up.stem.conv1.weight":
        return "backbone.body.conv1.weight"
    m = re.match(r"^backbone\.bottom_up\.stem\.conv1\.norm\.(\w+)$", key)
    if m:
        return f"backbone.body.bn1.{m.group(1)}"
    renamed = _stage_blocks(key)
    if renamed:
        return renamed
    m = re.match(r"^backbone\.fpn_(lateral|output)(\d)\.(weight|bias)$", key)
    if m:
        stages = [int(f[3:]) for f in spec.fpn_in_features]
        stage = int(m.group(2))
        if stage not in stages:
            return None
        block = "inner_blocks" if m.group(1) == "lateral" else "layer_blocks"
        return f"backbone.fpn.{block}.{stages.index(stage)}.0.{m.group(3)}"
    m = re.match(r"^proposal_generator\.rpn_head\.(conv|objectness_logits|anchor_deltas)\."
                 r"(?:conv(\d+)\.)?(weight|bias)$", key)
    if m:
        part, index, leaf = m.groups()
        if part == "conv":
            return f"rpn.head.conv.{int(index or 0)}.0.{leaf}"
        return f"rpn.head.{'cls_logits' if part == 'objectness_logits' else 'bbox_pred'}.{leaf}"
    m = re.match(r"^roi_heads\.box_head\.(conv|fc)(\d+)\.(weight|bias)$", key)
    if m:
        kind, k, leaf = m.group(1), int(m.group(2)), m.group(3)
        if spec.box_num_conv == 0 and spec.box_num_fc == 2 and kind == "fc":
            return f"roi_heads.box_head.fc{5 + k}.{leaf}"  # TwoMLPHead's fc6, fc7
        if kind == "conv":
            return f"roi_heads.box_head.{k - 1}.0.{leaf}"  # FastRCNNConvFCHead: Conv2dNormActivation
        return f"roi_heads.box_head.{spec.box_num_conv + 1 + 2 * (k - 1)}.{leaf}"  # after Flatten: Linear, ReLU
    m = re.match(r"^roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)$", key)
    if m:
        return f"roi_heads.box_predictor.{m.group(1)}.{m.group(2)}"
    m = re.match(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$", key)
    if m:
        return f"roi_heads.mask_head.{int(m.group(1)) - 1}.0.{m.group(2)}"
    m = re.match(r"^roi_heads\.mask_head\.(deconv|predictor)\.(weight|bias)$", key)
    if m:
        return f"roi_heads.mask_predictor.{'conv5_mask' if m.group(1) == 'deconv' else 'mask_fcn_logits'}.{m.group(2)}"
    return None


def _mismatch(source: str, d2_key: str, expected: str, found: tuple[int, ...], keys: str) -> WeightsError:
    return WeightsError(f"{source}: parameter {d2_key!r} has shape {list(found)} but the YAML's network needs "
                        f"{expected}; check {keys} in the YAML (and that CONFIG_FILE belongs to these weights)")


def convert_state_dict(state: dict[str, torch.Tensor], spec: Detectron2Spec, target: dict[str, torch.Tensor],
                       source: str = "weights") -> dict[str, torch.Tensor]:
    """detectron2 parameters -> the state dict of network.build_network(spec) (target: its state_dict(),
    for the shapes). Raises WeightsError naming the key for anything missing, extra or misshapen."""
    k = spec.num_classes
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unknown = []
    for d2_key, value in state.items():
        if _IGNORED.match(d2_key):
            continue
        tv_key = rename(d2_key, spec)
        if tv_key is None or tv_key not in target:
            unknown.append(d2_key)
            continue
        origin[tv_key] = d2_key
        shape = tuple(value.shape)
        if tv_key == "backbone.body.conv1.weight":
            if value.dim() != 4 or shape[1] != spec.channels:
                raise WeightsError(f"{source}: parameter {d2_key!r} takes {shape[1] if value.dim() > 1 else '?'} "
                                   f"input channels but MODEL.PIXEL_MEAN in the YAML has {spec.channels} values "
                                   "(3: color; 4: color + depth): they must agree")
            if spec.input_format == "BGR":
                value = torch.cat([value[:, [2, 1, 0]], value[:, 3:]], dim=1)
        elif tv_key.startswith("roi_heads.box_predictor.cls_score."):
            if shape[0] != k + 1:
                raise _mismatch(source, d2_key, f"{k + 1} rows (NUM_CLASSES {k} + background)", shape,
                                "MODEL.ROI_HEADS.NUM_CLASSES (and CATEGORY_FILE)")
            value = torch.cat([value[k:], value[:k]], dim=0)  # background last -> first
        elif tv_key.startswith("roi_heads.box_predictor.bbox_pred."):
            per = 1 if spec.cls_agnostic_bbox_reg else k
            if shape[0] != 4 * per:
                what = "class-agnostic: 4" if per == 1 else f"4 x NUM_CLASSES = {4 * k}"
                raise _mismatch(source, d2_key, f"{what} rows", shape,
                                "MODEL.ROI_HEADS.NUM_CLASSES, MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG")
            value = (value.repeat(k + 1, *([1] * (value.dim() - 1))) if per == 1
                     else torch.cat([torch.zeros_like(value[:4]), value], dim=0))
        elif tv_key.startswith("roi_heads.mask_predictor.mask_fcn_logits."):
            per = 1 if spec.cls_agnostic_mask else k
            if shape[0] != per:
                raise _mismatch(source, d2_key, f"{per} output channels", shape,
                                "MODEL.ROI_HEADS.NUM_CLASSES, MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK")
            value = (value.repeat(k + 1, *([1] * (value.dim() - 1))) if per == 1
                     else torch.cat([torch.zeros_like(value[:1]), value], dim=0))
        out[tv_key] = value.contiguous()

    # Older detectron2 checkpoints may lack a frozen batch norm's running statistics (detectron2 fills them).
    for tv_key in target:
        if tv_key not in out and tv_key.endswith(("running_mean", "running_var")):
            base = tv_key.rsplit(".", 1)[0]
            if f"{base}.weight" in out:
                fill = torch.zeros_like if tv_key.endswith("running_mean") else torch.ones_like
                out[tv_key] = fill(target[tv_key])

    missing = [t for t in target if t not in out]
    if unknown or missing:
        parts = []
        if missing:
            parts.append(f"the YAML's network needs {len(missing)} parameter(s) the checkpoint lacks, e.g. "
                         f"{missing[0]!r} (check {hint(missing[0])})")
        if unknown:
            parts.append(f"the checkpoint has {len(unknown)} parameter(s) the YAML's network has no place for, "
                         f"e.g. {unknown[0]!r}")
        raise WeightsError(f"{source}: does not fit the network the YAML describes: " + "; ".join(parts)
                           + ". Check that CONFIG_FILE is the config these weights were trained with")
    for tv_key, value in out.items():
        want = tuple(target[tv_key].shape)
        if tuple(value.shape) != want:
            d2_key = origin.get(tv_key, tv_key)
            raise _mismatch(source, d2_key, str(list(want)) + f" (as {tv_key})", tuple(state[d2_key].shape)
                            if d2_key in state else tuple(value.shape), hint(tv_key))
    return out

