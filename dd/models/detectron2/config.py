"""A detectron2 YAML config, read as detectron2 reads it, validated into a Detectron2Spec.

detectron2 (through fvcore) loads a config file by resolving its ``_BASE_`` chain
relative to each file, merging each file over its bases, and merging the result
over its table of defaults (detectron2/config/defaults.py). Users ship the YAML
their training dumped, or a short one with a ``_BASE_``; either way the keys the
file leaves out take detectron2's defaults, which differ from torchvision's
(BGR input in 0-255, no ROI box head by default, ...). This module does the same,
for every key that decides inference, and refuses at start, with the file, the key
and the value, what the serving network does not implement (deformable convs,
cascade heads, rotated boxes, PointRend, panoptic, GN, C4/DC5 backbones, ...).

Pure Python (PyYAML, no torch): the supervisor, frontends and ``inspect`` use it.
YAML is parsed with safe_load only; detectron2 falls back to yaml.unsafe_load for
Python tags, which may run code, so this reader accepts only ``!!python/tuple``
(read as a list) and refuses other tags.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from dd.config import ConfigError

BASE_KEY = "_BASE_"

# detectron2's defaults (detectron2/config/defaults.py) for every key this reader uses or checks.
DEFAULTS: dict[str, Any] = {
    "VERSION": 2,
    "MODEL": {
        "META_ARCHITECTURE": "GeneralizedRCNN",
        "MASK_ON": False,
        "KEYPOINT_ON": False,
        "LOAD_PROPOSALS": False,
        "PIXEL_MEAN": [103.530, 116.280, 123.675],
        "PIXEL_STD": [1.0, 1.0, 1.0],
        "BACKBONE": {"NAME": "build_resnet_backbone"},
        "RESNETS": {
            "DEPTH": 50,
            "OUT_FEATURES": ["res4"],
            "NUM_GROUPS": 1,
            "NORM": "FrozenBN",
            "WIDTH_PER_GROUP": 64,
            "STRIDE_IN_1X1": True,
            "RES5_DILATION": 1,
            "RES2_OUT_CHANNELS": 256,
            "STEM_OUT_CHANNELS": 64,
            "DEFORM_ON_PER_STAGE": [False, False, False, False],
        },
        "FPN": {"IN_FEATURES": [], "OUT_CHANNELS": 256, "NORM": "", "FUSE_TYPE": "sum"},
        "PROPOSAL_GENERATOR": {"NAME": "RPN", "MIN_SIZE": 0},
        "ANCHOR_GENERATOR": {
            "NAME": "DefaultAnchorGenerator",
            "SIZES": [[32, 64, 128, 256, 512]],
            "ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
            "ANGLES": [[-90, 0, 90]],
            "OFFSET": 0.0,
        },
        "RPN": {
            "HEAD_NAME": "StandardRPNHead",
            "IN_FEATURES": ["res4"],
            "BBOX_REG_WEIGHTS": [1.0, 1.0, 1.0, 1.0],
            "PRE_NMS_TOPK_TEST": 6000,
            "POST_NMS_TOPK_TEST": 1000,
            "NMS_THRESH": 0.7,
            "CONV_DIMS": [-1],
        },
        "ROI_HEADS": {
            "NAME": "Res5ROIHeads",
            "NUM_CLASSES": 80,
            "IN_FEATURES": ["res4"],
            "SCORE_THRESH_TEST": 0.05,
            "NMS_THRESH_TEST": 0.5,
        },
        "ROI_BOX_HEAD": {
            "NAME": "",
            "BBOX_REG_WEIGHTS": [10.0, 10.0, 5.0, 5.0],
            "POOLER_RESOLUTION": 14,
            "POOLER_SAMPLING_RATIO": 0,
            "POOLER_TYPE": "ROIAlignV2",
            "NUM_FC": 0,
            "FC_DIM": 1024,
            "NUM_CONV": 0,
            "CONV_DIM": 256,
            "NORM": "",
            "CLS_AGNOSTIC_BBOX_REG": False,
            "USE_SIGMOID_CE": False,
        },
        "ROI_MASK_HEAD": {
            "NAME": "MaskRCNNConvUpsampleHead",
            "POOLER_RESOLUTION": 14,
            "POOLER_SAMPLING_RATIO": 0,
            "NUM_CONV": 0,
            "CONV_DIM": 256,
            "NORM": "",
            "CLS_AGNOSTIC_MASK": False,
            "POOLER_TYPE": "ROIAlignV2",
        },
    },
    "INPUT": {"MIN_SIZE_TEST": 800, "MAX_SIZE_TEST": 1333, "FORMAT": "BGR"},
    "TEST": {"DETECTIONS_PER_IMAGE": 100, "AUG": {"ENABLED": False}},
}

# detectron2 keys that exist in its defaults but do not change this network's inference answers
# (training, evaluation, heads that are off). Keys under MODEL/INPUT/TEST that are in neither table
# are not detectron2's: `inspect` lists them as ignored (a fork's own keys, for instance).
_INERT_KEYS = frozenset("""
MODEL.DEVICE MODEL.WEIGHTS MODEL.BACKBONE.FREEZE_AT MODEL.RESNETS.DEFORM_MODULATED MODEL.RESNETS.DEFORM_NUM_GROUPS
MODEL.RPN.BOUNDARY_THRESH MODEL.RPN.IOU_THRESHOLDS MODEL.RPN.IOU_LABELS MODEL.RPN.BATCH_SIZE_PER_IMAGE
MODEL.RPN.POSITIVE_FRACTION MODEL.RPN.BBOX_REG_LOSS_TYPE MODEL.RPN.BBOX_REG_LOSS_WEIGHT MODEL.RPN.SMOOTH_L1_BETA
MODEL.RPN.LOSS_WEIGHT MODEL.RPN.PRE_NMS_TOPK_TRAIN MODEL.RPN.POST_NMS_TOPK_TRAIN MODEL.ROI_HEADS.IOU_THRESHOLDS
MODEL.ROI_HEADS.IOU_LABELS MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE MODEL.ROI_HEADS.POSITIVE_FRACTION
MODEL.ROI_HEADS.PROPOSAL_APPEND_GT MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT
MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES MODEL.ROI_BOX_HEAD.USE_FED_LOSS
MODEL.ROI_BOX_HEAD.FED_LOSS_FREQ_WEIGHT_POWER MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES
MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS MODEL.ROI_BOX_CASCADE_HEAD.IOUS MODEL.ROI_KEYPOINT_HEAD.NAME
MODEL.ROI_KEYPOINT_HEAD.POOLER_RESOLUTION MODEL.ROI_KEYPOINT_HEAD.POOLER_SAMPLING_RATIO
MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
MODEL.ROI_KEYPOINT_HEAD.NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS MODEL.ROI_KEYPOINT_HEAD.LOSS_WEIGHT
MODEL.ROI_KEYPOINT_HEAD.POOLER_TYPE MODEL.SEM_SEG_HEAD.NAME MODEL.SEM_SEG_HEAD.IN_FEATURES
MODEL.SEM_SEG_HEAD.IGNORE_VALUE MODEL.SEM_SEG_HEAD.NUM_CLASSES MODEL.SEM_SEG_HEAD.CONVS_DIM
MODEL.SEM_SEG_HEAD.COMMON_STRIDE MODEL.SEM_SEG_HEAD.NORM MODEL.SEM_SEG_HEAD.LOSS_WEIGHT
MODEL.PANOPTIC_FPN.INSTANCE_LOSS_WEIGHT MODEL.PANOPTIC_FPN.COMBINE.ENABLED MODEL.PANOPTIC_FPN.COMBINE.OVERLAP_THRESH
MODEL.PANOPTIC_FPN.COMBINE.STUFF_AREA_LIMIT MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH
MODEL.RETINANET.NUM_CLASSES MODEL.RETINANET.IN_FEATURES MODEL.RETINANET.NUM_CONVS MODEL.RETINANET.IOU_THRESHOLDS
MODEL.RETINANET.IOU_LABELS MODEL.RETINANET.PRIOR_PROB MODEL.RETINANET.SCORE_THRESH_TEST
MODEL.RETINANET.TOPK_CANDIDATES_TEST MODEL.RETINANET.NMS_THRESH_TEST MODEL.RETINANET.BBOX_REG_WEIGHTS
MODEL.RETINANET.FOCAL_LOSS_GAMMA MODEL.RETINANET.FOCAL_LOSS_ALPHA MODEL.RETINANET.SMOOTH_L1_LOSS_BETA
MODEL.RETINANET.BBOX_REG_LOSS_TYPE MODEL.RETINANET.NORM INPUT.MIN_SIZE_TRAIN INPUT.MIN_SIZE_TRAIN_SAMPLING
INPUT.MAX_SIZE_TRAIN INPUT.RANDOM_FLIP INPUT.CROP.ENABLED INPUT.CROP.TYPE INPUT.CROP.SIZE INPUT.MASK_FORMAT
TEST.EXPECTED_RESULTS TEST.EVAL_PERIOD TEST.KEYPOINT_OKS_SIGMAS TEST.AUG.MIN_SIZES TEST.AUG.MAX_SIZE TEST.AUG.FLIP
TEST.PRECISE_BN.ENABLED TEST.PRECISE_BN.NUM_ITER
""".split())

# Residual blocks per stage (res2..res5) for each depth, as detectron2's build_resnet_backbone.
BLOCKS_PER_STAGE: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3),
}
_RES_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
# At inference, every batch norm of a trained network is an affine map of its running statistics; the
# synchronised variants differ from BN only in training.
_BATCH_NORMS = ("FrozenBN", "BN", "SyncBN", "naiveSyncBN", "naiveSyncBN_N", "nnSyncBN")


@dataclass(frozen=True)
class Detectron2Spec:
    """What a detectron2 Mask R-CNN config says about inference, validated. Names follow the YAML keys.

    pixel_mean / pixel_std are as in the YAML: 0-255 for the color channels in INPUT.FORMAT order
    (B, G, R for "BGR"), then metres for a fourth (depth) channel.
    """

    source: str
    input_format: str
    pixel_mean: tuple[float, ...]
    pixel_std: tuple[float, ...]
    min_size_test: int
    max_size_test: int
    # backbone: ResNet + FPN
    depth: int
    stride_in_1x1: bool
    num_groups: int
    width_per_group: int
    res2_out_channels: int
    stem_out_channels: int
    resnet_norm: str
    fpn_in_features: tuple[str, ...]
    fpn_out_channels: int
    # RPN
    anchor_sizes: tuple[tuple[float, ...], ...]  # one tuple per RPN level
    anchor_aspect_ratios: tuple[tuple[float, ...], ...]
    anchor_offset: float
    rpn_in_features: tuple[str, ...]
    rpn_conv_depth: int
    rpn_pre_nms_topk_test: int
    rpn_post_nms_topk_test: int
    rpn_nms_thresh: float
    rpn_bbox_reg_weights: tuple[float, float, float, float]
    rpn_min_size: float
    # ROI heads
    num_classes: int
    roi_in_features: tuple[str, ...]
    score_thresh_test: float
    nms_thresh_test: float
    detections_per_image: int
    box_num_conv: int
    box_conv_dim: int
    box_num_fc: int
    box_fc_dim: int
    box_pooler_resolution: int
    box_pooler_sampling_ratio: int
    box_pooler_aligned: bool
    box_bbox_reg_weights: tuple[float, float, float, float]
    cls_agnostic_bbox_reg: bool
    mask_num_conv: int
    mask_conv_dim: int
    mask_pooler_resolution: int
    mask_pooler_sampling_ratio: int
    mask_pooler_aligned: bool
    cls_agnostic_mask: bool
    # For `inspect`: the keys the file(s) left to detectron2's defaults, and keys that are not detectron2's.
    defaulted: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()

    @property
    def channels(self) -> int:
        return len(self.pixel_mean)

    @property
    def input_kind(self) -> str:
        return "rgbd" if self.channels == 4 else "rgb"

    @property
    def channel_order(self) -> tuple[str, ...]:
        """The channels of the network input as trained, e.g. ("B", "G", "R", "D")."""
        color = ("B", "G", "R") if self.input_format == "BGR" else ("R", "G", "B")
        return color + (("D",) if self.channels == 4 else ())

    def rgb_mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """PIXEL_MEAN / PIXEL_STD reordered to R, G, B (then D): the order every engine feeds."""
        order = [2, 1, 0] if self.input_format == "BGR" else [0, 1, 2]
        order += list(range(3, self.channels))
        return tuple(self.pixel_mean[i] for i in order), tuple(self.pixel_std[i] for i in order)

    @property
    def fpn_levels(self) -> tuple[str, ...]:
        """The FPN's outputs, high resolution first: p<k> for each input res<k>, then the max-pool level."""
        ks = [int(f[3:]) for f in self.fpn_in_features]
        return tuple(f"p{k}" for k in ks) + (f"p{ks[-1] + 1}",)

    @staticmethod
    def stride(level: str) -> int:
        """Stride of an FPN level p<k> (2 ** k)."""
        return 2 ** int(level[1:])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Detectron2Spec":
        """The inverse of to_dict after a JSON round trip (lists back to tuples)."""

        def tup(v: Any) -> Any:
            return tuple(tup(x) for x in v) if isinstance(v, list) else v

        return cls(**{f.name: tup(d[f.name]) for f in fields(cls) if f.name in d})


# -- reading the YAML --------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """safe_load plus detectron2's one common Python tag, !!python/tuple, read as a list."""


_Loader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: loader.construct_sequence(node))


def _load_one(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        loader = _Loader(text)  # what yaml.load(text, _Loader) does, with the SafeLoader subclass spelled out
        try:
            doc = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.constructor.ConstructorError as exc:
        raise ConfigError(f"{path}: uses a YAML tag this server does not evaluate ({exc.problem}); detectron2 "
                          "would run it with yaml.unsafe_load. Replace it with a plain value") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: is not valid YAML: {exc}") from exc
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: must hold a mapping of config keys (detectron2 YAML)")
    return doc


def _leaves(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _leaves(v, key + ".")
        else:
            out.append(key)
    return out


def _merge_into(a: dict[str, Any], b: dict[str, Any], path: Path, prefix: str = "") -> None:
    """Merges a into b (a wins), as fvcore's merge_a_into_b: mappings merge key by key."""
    for k, v in a.items():
        if isinstance(v, dict) and k in b:
            if not isinstance(b[k], dict):
                raise ConfigError(f"{path}: key {prefix + k!r} is a mapping here but a value in its _BASE_")
            _merge_into(v, b[k], path, f"{prefix}{k}.")
        else:
            b[k] = v


def load_yaml_with_base(path: Path | str, _chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, Path]]:
    """A YAML file with its _BASE_ chain merged in, as detectron2 loads it, before defaults.

    Returns the merged mapping and, for each leaf key (dotted), the file its value came from.
    _BASE_ (a path or a list of paths) is relative to the file naming it, or absolute, or ~/...
    """
    path = Path(path)
    resolved = path.resolve()
    if resolved in _chain:
        raise ConfigError(f"{path}: key '_BASE_' makes a cycle: " + " -> ".join(str(p) for p in _chain + (resolved,)))
    if not path.is_file():
        where = f" (named by _BASE_ in {_chain[-1]})" if _chain else ""
        raise ConfigError(f"{path}: no such config file{where}")
    doc = _load_one(path)
    origins = {k: path for k in _leaves(doc) if k != BASE_KEY}
    if BASE_KEY not in doc:
        return doc, origins
    bases = doc.pop(BASE_KEY)
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: key '_BASE_' must be a file path or a list of file paths, got {bases!r}")
    merged: dict[str, Any] = {}
    merged_origins: dict[str, Path] = {}
    for base in bases:
        if base.startswith(("http://", "https://")):
            raise ConfigError(f"{path}: key '_BASE_' = {base!r}: remote configs are not fetched; copy the file "
                              "into the model folder and name it by a relative path")
        base_path = Path(os.path.expanduser(base))
        if not base_path.is_absolute():
            base_path = path.parent / base_path
        sub, sub_origins = load_yaml_with_base(base_path, _chain + (resolved,))
        _merge_into(sub, merged, base_path)
        merged_origins.update(sub_origins)
    _merge_into(doc, merged, path)
    merged_origins.update(origins)
    return merged, merged_origins


# -- validation ----------------------------------------------------------------------------------------

class _Reader:
    """Typed access to the merged config, each error naming the file the value came from, and the key."""

    def __init__(self, path: Path, doc: dict[str, Any], origins: dict[str, Path]) -> None:
        self.path = path
        self.doc = doc
        self.origins = origins
        self.merged = copy.deepcopy(DEFAULTS)
        _merge_into(doc, self.merged, path)
        self.defaulted: list[str] = []

    def raw(self, key: str) -> Any:
        node: Any = self.merged
        for part in key.split("."):
            node = node[part]
        return node

    def where(self, key: str) -> str:
        src = self.origins.get(key)
        return f"{src if src is not None else self.path}: key {key!r}"

    def error(self, key: str, problem: str) -> ConfigError:
        value = self.raw(key)
        default = "" if key in self.origins else " (detectron2's default)"
        return ConfigError(f"{self.where(key)} = {value!r}{default}: {problem}")

    def get(self, key: str, kind: str) -> Any:
        value = self.raw(key)
        if key not in self.origins and key not in self.defaulted:
            self.defaulted.append(key)
        if kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            value = float(value) if ok else value
        elif kind == "str":
            ok = isinstance(value, str)
        elif kind in ("floats", "ints", "strs", "bools"):
            item = {"floats": "float", "ints": "int", "strs": "str", "bools": "bool"}[kind]
            ok = isinstance(value, (list, tuple)) and all(_is(v, item) for v in value)
            value = tuple(float(v) for v in value) if ok and item == "float" else (tuple(value) if ok else value)
        else:  # pragma: no cover - programming error
            raise ValueError(kind)
        if not ok:
            raise self.error(key, f"expected {_KIND_NAMES[kind]}")
        return value

    def require(self, key: str, kind: str, allowed: tuple[Any, ...], why: str = "") -> Any:
        value = self.get(key, kind)
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise self.error(key, (why or "not supported by this server") + f"; supported: {choices}")
        return value


_KIND_NAMES = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
               "floats": "a list of numbers", "ints": "a list of integers", "strs": "a list of names",
               "bools": "a list of true/false"}


def _is(v: Any, kind: str) -> bool:
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return isinstance(v, str)


def _per_level(r: _Reader, key: str, levels: int) -> tuple[tuple[float, ...], ...]:
    """ANCHOR_GENERATOR.SIZES / ASPECT_RATIOS broadcast over the RPN levels, as detectron2's _broadcast_params."""
    value = r.raw(key)
    if not isinstance(value, (list, tuple)) or not value:
        raise r.error(key, "expected a non-empty list (of lists) of numbers")
    if not isinstance(value[0], (list, tuple)):
        per = [value] * levels
    elif len(value) == 1:
        per = list(value) * levels
    elif len(value) == levels:
        per = list(value)
    else:
        raise r.error(key, f"has {len(value)} lists but the RPN has {levels} input levels (give 1 or {levels})")
    out = []
    for v in per:
        if not isinstance(v, (list, tuple)) or not v or not all(_is(x, "float") and x > 0 for x in v):
            raise r.error(key, "expected positive numbers")
        out.append(tuple(float(x) for x in v))
    if key not in r.origins:
        r.defaulted.append(key)
    return tuple(out)


def _pooler_aligned(r: _Reader, key: str) -> bool:
    kind = r.require(key, "str", ("ROIAlignV2", "ROIAlign"), "ROIPool and ROIAlignRotated are not supported")
    return kind == "ROIAlignV2"


def _positive(r: _Reader, key: str, kind: str = "int", zero_ok: bool = False) -> Any:
    value = r.get(key, kind)
    if value < 0 or (value == 0 and not zero_ok):
        raise r.error(key, "must be positive" if not zero_ok else "must not be negative")
    return value


def _fraction(r: _Reader, key: str) -> float:
    value = r.get(key, "float")
    if not 0.0 <= value <= 1.0:
        raise r.error(key, "must be in [0, 1]")
    return value


def read_detectron2_yaml(path: Path | str) -> Detectron2Spec:
    """The Mask R-CNN a detectron2 YAML describes, merged over detectron2's defaults, or one ConfigError."""
    path = Path(path)
    doc, origins = load_yaml_with_base(path)
    if "VERSION" not in doc and ("WEIGHT" in (doc.get("MODEL") or {}) or "AUG_ON" in (doc.get("TEST") or {})):
        raise ConfigError(f"{path}: looks like a version-1 detectron2 config (MODEL.WEIGHT / TEST.AUG_ON and no "
                          "VERSION); load it once with detectron2 and save cfg.dump() as the CONFIG_FILE")
    r = _Reader(path, doc, origins)
    version = r.get("VERSION", "int")
    if version != 2:
        raise r.error("VERSION", "only version-2 configs (detectron2's current format) are read")

    r.require("MODEL.META_ARCHITECTURE", "str", ("GeneralizedRCNN",),
              "only Mask R-CNN (GeneralizedRCNN) is served; RetinaNet, PanopticFPN, semantic segmentation and "
              "proposal-only models are not")
    r.require("MODEL.MASK_ON", "bool", (True,), "this server serves instance masks (Mask R-CNN): set MASK_ON: true")
    r.require("MODEL.KEYPOINT_ON", "bool", (False,), "keypoint heads are not supported")
    r.require("MODEL.LOAD_PROPOSALS", "bool", (False,), "precomputed proposals are not supported")
    r.require("MODEL.BACKBONE.NAME", "str", ("build_resnet_fpn_backbone",),
              "only the ResNet-FPN backbone is supported (no C4/DC5, RetinaNet-FPN, RegNet, ViT, Swin, ...)")

    depth = r.require("MODEL.RESNETS.DEPTH", "int", tuple(BLOCKS_PER_STAGE))
    norm = r.require("MODEL.RESNETS.NORM", "str", _BATCH_NORMS,
                     "group/layer norm backbones are not supported (batch norms are: at inference they are all "
                     "the same affine map)")
    r.require("MODEL.RESNETS.RES5_DILATION", "int", (1,), "dilated res5 (DC5) backbones are not supported")
    deform = r.get("MODEL.RESNETS.DEFORM_ON_PER_STAGE", "bools")
    if any(deform):
        raise r.error("MODEL.RESNETS.DEFORM_ON_PER_STAGE", "deformable convolutions are not supported")
    num_groups = _positive(r, "MODEL.RESNETS.NUM_GROUPS")
    width = _positive(r, "MODEL.RESNETS.WIDTH_PER_GROUP")
    res2_out = _positive(r, "MODEL.RESNETS.RES2_OUT_CHANNELS")
    stem_out = _positive(r, "MODEL.RESNETS.STEM_OUT_CHANNELS")
    stride_in_1x1 = r.get("MODEL.RESNETS.STRIDE_IN_1X1", "bool")
    if depth in (18, 34):
        if res2_out != 64:
            raise r.error("MODEL.RESNETS.RES2_OUT_CHANNELS", f"must be 64 for R{depth} (as detectron2 requires)")
        if num_groups != 1:
            raise r.error("MODEL.RESNETS.NUM_GROUPS", f"must be 1 for R{depth} (as detectron2 requires)")
    out_features = r.get("MODEL.RESNETS.OUT_FEATURES", "strs")

    fpn_in = r.get("MODEL.FPN.IN_FEATURES", "strs")
    names = list(_RES_STRIDES)
    if (not fpn_in or any(f not in _RES_STRIDES for f in fpn_in) or fpn_in[-1] != "res5"
            or list(fpn_in) != names[names.index(fpn_in[0]):]):
        raise r.error("MODEL.FPN.IN_FEATURES", "must be consecutive ResNet stages ending with res5, e.g. "
                      "[res2, res3, res4, res5] (the FPN's max-pool top level reads p5)")
    missing = [f for f in fpn_in if f not in out_features]
    if missing:
        raise r.error("MODEL.RESNETS.OUT_FEATURES", f"must include the FPN's inputs {list(fpn_in)}; "
                      f"missing {missing}")
    fpn_channels = _positive(r, "MODEL.FPN.OUT_CHANNELS")
    r.require("MODEL.FPN.NORM", "str", ("",), "normalised FPN convolutions (GN, BN) are not supported")
    r.require("MODEL.FPN.FUSE_TYPE", "str", ("sum",), "only the summing FPN is supported")
    ks = [int(f[3:]) for f in fpn_in]
    levels = tuple(f"p{k}" for k in ks) + (f"p{ks[-1] + 1}",)

    r.require("MODEL.PROPOSAL_GENERATOR.NAME", "str", ("RPN",), "rotated (RRPN) or precomputed proposals are not "
              "supported")
    rpn_min_size = _positive(r, "MODEL.PROPOSAL_GENERATOR.MIN_SIZE", "float", zero_ok=True)
    r.require("MODEL.ANCHOR_GENERATOR.NAME", "str", ("DefaultAnchorGenerator",), "rotated anchors are not supported")
    offset = r.get("MODEL.ANCHOR_GENERATOR.OFFSET", "float")
    if not 0.0 <= offset < 1.0:
        raise r.error("MODEL.ANCHOR_GENERATOR.OFFSET", "must be in [0, 1) (as detectron2 requires)")
    r.require("MODEL.RPN.HEAD_NAME", "str", ("StandardRPNHead",))
    rpn_in = r.get("MODEL.RPN.IN_FEATURES", "strs")
    if tuple(rpn_in) != levels:
        raise r.error("MODEL.RPN.IN_FEATURES", f"must be every FPN level, {list(levels)} for FPN.IN_FEATURES "
                      f"{list(fpn_in)}")
    sizes = _per_level(r, "MODEL.ANCHOR_GENERATOR.SIZES", len(levels))
    ratios = _per_level(r, "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", len(levels))
    per_loc = {len(s) * len(a) for s, a in zip(sizes, ratios)}
    if len(per_loc) != 1:
        raise r.error("MODEL.ANCHOR_GENERATOR.SIZES", "every level must have the same number of anchors "
                      "(sizes x aspect ratios), as detectron2's RPN head requires")
    conv_dims = r.get("MODEL.RPN.CONV_DIMS", "ints")
    if not conv_dims or any(d != -1 for d in conv_dims):
        raise r.error("MODEL.RPN.CONV_DIMS", "only [-1] (convolutions as wide as the FPN) is supported")
    pre_topk = _positive(r, "MODEL.RPN.PRE_NMS_TOPK_TEST")
    post_topk = _positive(r, "MODEL.RPN.POST_NMS_TOPK_TEST")
    rpn_nms = _fraction(r, "MODEL.RPN.NMS_THRESH")
    rpn_weights = r.get("MODEL.RPN.BBOX_REG_WEIGHTS", "floats")
    if len(rpn_weights) != 4 or any(w <= 0 for w in rpn_weights):
        raise r.error("MODEL.RPN.BBOX_REG_WEIGHTS", "expected 4 positive numbers")

    r.require("MODEL.ROI_HEADS.NAME", "str", ("StandardROIHeads",),
              "cascade (CascadeROIHeads), C4 (Res5ROIHeads) and rotated heads are not supported")
    num_classes = _positive(r, "MODEL.ROI_HEADS.NUM_CLASSES")
    roi_in = r.get("MODEL.ROI_HEADS.IN_FEATURES", "strs")
    if not roi_in or any(f not in levels[:-1] for f in roi_in) or (
            list(roi_in) != list(levels[levels.index(roi_in[0]):levels.index(roi_in[0]) + len(roi_in)])):
        raise r.error("MODEL.ROI_HEADS.IN_FEATURES", f"must be consecutive FPN levels among {list(levels[:-1])}")
    score = _fraction(r, "MODEL.ROI_HEADS.SCORE_THRESH_TEST")
    nms = _fraction(r, "MODEL.ROI_HEADS.NMS_THRESH_TEST")
    dets = r.get("TEST.DETECTIONS_PER_IMAGE", "int")
    if dets < 1:
        raise r.error("TEST.DETECTIONS_PER_IMAGE", "must be at least 1")

    r.require("MODEL.ROI_BOX_HEAD.NAME", "str", ("FastRCNNConvFCHead",))
    r.require("MODEL.ROI_BOX_HEAD.NORM", "str", ("",), "normalised box-head convolutions are not supported")
    r.require("MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", "bool", (False,), "sigmoid class scores are not supported")
    box_num_conv = _positive(r, "MODEL.ROI_BOX_HEAD.NUM_CONV", zero_ok=True)
    box_conv_dim = _positive(r, "MODEL.ROI_BOX_HEAD.CONV_DIM")
    box_num_fc = _positive(r, "MODEL.ROI_BOX_HEAD.NUM_FC", zero_ok=True)
    box_fc_dim = _positive(r, "MODEL.ROI_BOX_HEAD.FC_DIM")
    box_res = _positive(r, "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION")
    box_sr = _positive(r, "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO", zero_ok=True)
    box_aligned = _pooler_aligned(r, "MODEL.ROI_BOX_HEAD.POOLER_TYPE")
    box_weights = r.get("MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS", "floats")
    if len(box_weights) != 4 or any(w <= 0 for w in box_weights):
        raise r.error("MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS", "expected 4 positive numbers")
    agnostic_box = r.get("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "bool")

    r.require("MODEL.ROI_MASK_HEAD.NAME", "str", ("MaskRCNNConvUpsampleHead",),
              "PointRend and other mask heads are not supported")
    r.require("MODEL.ROI_MASK_HEAD.NORM", "str", ("",), "normalised mask-head convolutions are not supported")
    mask_num_conv = _positive(r, "MODEL.ROI_MASK_HEAD.NUM_CONV", zero_ok=True)
    mask_conv_dim = _positive(r, "MODEL.ROI_MASK_HEAD.CONV_DIM")
    mask_res = _positive(r, "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION")
    mask_sr = _positive(r, "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO", zero_ok=True)
    mask_aligned = _pooler_aligned(r, "MODEL.ROI_MASK_HEAD.POOLER_TYPE")
    agnostic_mask = r.get("MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", "bool")

    fmt = r.require("INPUT.FORMAT", "str", ("BGR", "RGB"), "detectron2's DefaultPredictor takes BGR or RGB")
    min_size = r.get("INPUT.MIN_SIZE_TEST", "int")
    if min_size < 1:
        raise r.error("INPUT.MIN_SIZE_TEST", "0 (no resizing) is not supported; set the size the model was "
                      "tested at, or MIN_SIZE in node_config.json")
    max_size = _positive(r, "INPUT.MAX_SIZE_TEST")
    mean = r.get("MODEL.PIXEL_MEAN", "floats")
    std = r.get("MODEL.PIXEL_STD", "floats")
    if len(mean) not in (3, 4):
        raise r.error("MODEL.PIXEL_MEAN", "expected 3 values (color) or 4 (color, then depth in metres)")
    if len(std) != len(mean):
        raise r.error("MODEL.PIXEL_STD", f"expected {len(mean)} values, as many as MODEL.PIXEL_MEAN")
    if any(s <= 0 for s in std):
        raise r.error("MODEL.PIXEL_STD", "values must be positive")

    ignored = sorted(k for k in _leaves(doc) if k.split(".")[0] in ("MODEL", "INPUT", "TEST")
                     and k not in _INERT_KEYS and not _has(DEFAULTS, k))
    return Detectron2Spec(
        source=str(path), input_format=fmt, pixel_mean=mean, pixel_std=std, min_size_test=min_size,
        max_size_test=max_size, depth=depth, stride_in_1x1=stride_in_1x1, num_groups=num_groups,
        width_per_group=width, res2_out_channels=res2_out, stem_out_channels=stem_out, resnet_norm=norm,
        fpn_in_features=tuple(fpn_in), fpn_out_channels=fpn_channels, anchor_sizes=sizes,
        anchor_aspect_ratios=ratios, anchor_offset=offset, rpn_in_features=tuple(rpn_in),
        rpn_conv_depth=len(conv_dims), rpn_pre_nms_topk_test=pre_topk, rpn_post_nms_topk_test=post_topk,
        rpn_nms_thresh=rpn_nms, rpn_bbox_reg_weights=rpn_weights, rpn_min_size=rpn_min_size,  # type: ignore[arg-type]
        num_classes=num_classes, roi_in_features=tuple(roi_in), score_thresh_test=score, nms_thresh_test=nms,
        detections_per_image=dets, box_num_conv=box_num_conv, box_conv_dim=box_conv_dim, box_num_fc=box_num_fc,
        box_fc_dim=box_fc_dim, box_pooler_resolution=box_res, box_pooler_sampling_ratio=box_sr,
        box_pooler_aligned=box_aligned, box_bbox_reg_weights=box_weights,  # type: ignore[arg-type]
        cls_agnostic_bbox_reg=agnostic_box, mask_num_conv=mask_num_conv, mask_conv_dim=mask_conv_dim,
        mask_pooler_resolution=mask_res, mask_pooler_sampling_ratio=mask_sr, mask_pooler_aligned=mask_aligned,
        cls_agnostic_mask=agnostic_mask, defaulted=tuple(r.defaulted), ignored=tuple(ignored),
    )


def _has(d: dict[str, Any], key: str) -> bool:
    node: Any = d
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True
