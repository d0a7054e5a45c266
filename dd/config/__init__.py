"""Model and server configuration: read, validated, with errors that say how to fix them.

Every check runs before any process starts, so that a typo in a node_config.json
is one clear line on the terminal and not a worker crash loop. This module is
shared by the supervisor, the frontends and the workers; it imports no engine
and no gRPC.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from dd.config.engines import (REGISTRY, available_engines, check_custom_target, check_options, detection_types,
                               is_custom)
from dd.config.errors import ConfigError, _err

if TYPE_CHECKING:
    from dd.models.detectron2.config import Detectron2Spec

NODE_CONFIG = "node_config.json"

# DETECTION_TYPE values in the users' node_config.json files, and what they mean: from the engine registry.
DETECTION_TYPES: dict[str, tuple[str, str]] = detection_types()
# Engines that run an exported graph (dd.export): their MODEL_WEIGHT is the graph or engine file.
EXPORTED_ENGINES = {"onnxruntime": "onnx", "tensorrt": "tensorrt"}
WEIGHTS_FORMATS = ("auto", "detectron2", "torchvision")
# node_config keys that a detectron2 model's YAML decides instead.
_YAML_DECIDES = {"ARCHITECTURE": "MODEL.RESNETS / FPN / ROI_*_HEAD", "PIXEL_MEAN": "MODEL.PIXEL_MEAN",
                 "PIXEL_STD": "MODEL.PIXEL_STD", "DEPTH_MEAN": "the 4th value of MODEL.PIXEL_MEAN",
                 "DEPTH_STD": "the 4th value of MODEL.PIXEL_STD"}
INPUT_KINDS = ("rgb", "rgbd")

# Mask R-CNN architecture knobs; the defaults are torchvision's maskrcnn_resnet50_fpn.
DEFAULT_ARCHITECTURE: dict[str, Any] = {
    "backbone": "resnet50",
    "fpn_channels": 256,
    "box_head_dim": 1024,
    "mask_head_channels": 256,
    "mask_head_layers": 4,
    "max_detections": 100,
}
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large")


@dataclass(frozen=True)
class ModelConfig:
    """One servable model, resolved from its folder's node_config.json."""

    name: str
    folder: Path
    config_path: Path
    detection_type: str
    engine: str
    input_kind: str
    weights: Path | None
    config_file: Path | None
    categories: tuple[str, ...]
    min_size: int = 800
    max_size: int = 1333
    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    max_batch_size: int = 4
    max_queue_delay_ms: float = 0.0
    instances_per_device: int = 1
    devices: tuple[str, ...] = ("auto",)
    architecture: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_ARCHITECTURE))
    pixel_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    pixel_std: tuple[float, ...] = (0.229, 0.224, 0.225)
    depth_mean_m: float = 2.0
    depth_std_m: float = 1.0
    depth_fill_m: float | None = None  # None: fill missing depth (0) with depth_mean_m (detectron2 models: keep 0)
    depth_unit_m: float = 0.001  # metres per unit of an integer depth image (DEPTH_UNIT; 0.001: millimetres)
    engine_options: dict[str, Any] = field(default_factory=dict)
    # "torchvision" or "detectron2": the weights' parameter names (WEIGHTS_FORMAT, else recognised by their keys).
    weights_format: str = "torchvision"
    # For detectron2 weights: their YAML, read as detectron2 reads it. pixel_mean/std above are then its
    # PIXEL_MEAN/STD in R, G, B order / 255, and depth_mean_m/depth_std_m its fourth values.
    detectron2: "Detectron2Spec | None" = None

    @property
    def depth_fill(self) -> float:
        """Metres that stand in for missing depth (0 in the image): DEPTH_FILL, else DEPTH_MEAN for
        torchvision weights, 0 (missing stays 0, as the users' detectron2 training saw it) for detectron2's."""
        if self.depth_fill_m is not None:
            return self.depth_fill_m
        return 0.0 if self.detectron2 is not None else self.depth_mean_m

    @property
    def num_classes(self) -> int:
        """Classes including the background, as torchvision counts them."""
        return len(self.categories) + 1

    @property
    def channels(self) -> int:
        return 4 if self.input_kind == "rgbd" else 3


def _get(raw: dict[str, Any], path: Path, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    if key not in raw or raw[key] is None:
        return default
    value = raw[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and kind is not bool:
        raise _err(path, key, f"expected {getattr(kind, '__name__', kind)}, got a boolean")
    if not isinstance(value, kind):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _err(path, key, f"expected {name}, got {type(value).__name__} {value!r}")
    return value


def _positive_int(raw: dict[str, Any], path: Path, key: str, default: int, upper: int = 1 << 20) -> int:
    value = _get(raw, path, key, int, default)
    if not 1 <= value <= upper:
        raise _err(path, key, f"must be an integer in [1, {upper}], got {value}")
    return value


def _read_categories(folder: Path, path: Path, raw: dict[str, Any]) -> tuple[str, ...]:
    if "CATEGORIES" in raw:
        cats = raw["CATEGORIES"]
        if not isinstance(cats, list) or not cats or not all(isinstance(c, str) and c for c in cats):
            raise _err(path, "CATEGORIES", "must be a non-empty list of category names")
        return tuple(cats)
    name = _get(raw, path, "CATEGORY_FILE", str, None)
    if name is None:
        raise _err(path, None, "needs CATEGORY_FILE (a text file, one category name a line) or CATEGORIES (a list)")
    cat_path = folder / name
    if not cat_path.is_file():
        raise _err(path, "CATEGORY_FILE", f"file {cat_path} does not exist")
    cats = tuple(line.strip() for line in cat_path.read_text().splitlines() if line.strip())
    if not cats:
        raise _err(path, "CATEGORY_FILE", f"{cat_path} lists no categories (one name a line)")
    return cats


def _read_detectron2_yaml(path: Path) -> dict[str, Any]:
    """The few keys of a detectron2-style config that shape a torchvision-format model (no defaults merged).

    Users ship detectron2-style YAML files as CONFIG_FILE beside torchvision weights too; the
    torchvision engine reads its depth, normalisation and input size from them (with the file's
    _BASE_ chain resolved) rather than asking for a second file. Keys the files leave out keep
    this server's defaults, not detectron2's.
    """
    from dd.models.detectron2.config import load_yaml_with_base

    doc, _ = load_yaml_with_base(path)
    out: dict[str, Any] = {}
    model = doc.get("MODEL") or {}
    depth = (model.get("RESNETS") or {}).get("DEPTH")
    if depth in (18, 34, 50, 101):
        out["backbone"] = f"resnet{depth}"
    if isinstance(model.get("PIXEL_MEAN"), list) and isinstance(model.get("PIXEL_STD"), list):
        out["pixel_mean_255"] = model["PIXEL_MEAN"]
        out["pixel_std_255"] = model["PIXEL_STD"]
    inp = doc.get("INPUT") or {}
    if isinstance(inp.get("MIN_SIZE_TEST"), int):
        out["min_size"] = inp["MIN_SIZE_TEST"]
    if isinstance(inp.get("MAX_SIZE_TEST"), int):
        out["max_size"] = inp["MAX_SIZE_TEST"]
    return out


def _engine_and_kind(raw: dict[str, Any], path: Path) -> tuple[str, str, str]:
    dtype = _get(raw, path, "DETECTION_TYPE", str, None)
    if dtype is None:
        raise _err(path, "DETECTION_TYPE", f"is missing; one of: {', '.join(DETECTION_TYPES)}")
    if dtype in DETECTION_TYPES:
        engine, kind = DETECTION_TYPES[dtype]
    else:
        kind = "rgbd" if dtype.upper().startswith("RGBD") else "rgb"
        engine = ""
    engine = _get(raw, path, "ENGINE", str, engine)
    kind = _get(raw, path, "INPUT_KIND", str, kind)
    available = ", ".join(available_engines())
    if not engine:
        raise _err(path, "DETECTION_TYPE", f"unknown value {dtype!r}; one of: {', '.join(DETECTION_TYPES)} "
                   f"(or set ENGINE to one of: {available}, or to 'package.module:ClassName')")
    if is_custom(engine):
        problem = check_custom_target(engine)
        if problem:
            raise _err(path, "ENGINE", problem)
    elif engine not in REGISTRY:
        raise _err(path, "ENGINE", f"unknown engine {engine!r}; one of: {available} (or 'package.module:ClassName')")
    elif not REGISTRY[engine].available:
        raise _err(path, "ENGINE" if "ENGINE" in raw else "DETECTION_TYPE",
                   f"engine {engine!r} is not available in this release; available: {available}")
    if kind not in INPUT_KINDS:
        raise _err(path, "INPUT_KIND", f"must be one of {INPUT_KINDS}, got {kind!r}")
    return dtype, engine, kind


def load_model_config(path: Path | str, name: str | None = None) -> ModelConfig:
    """Reads a model folder (or its node_config.json) into a validated ModelConfig."""
    path = Path(path)
    if path.is_dir():
        path = path / NODE_CONFIG
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; a model folder holds a {NODE_CONFIG} beside its weights")
    folder = path.parent.resolve()
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise _err(path, None, f"is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise _err(path, None, "must hold a JSON object")
    dtype, engine, kind = _engine_and_kind(raw, path)

    weights_name = _get(raw, path, "MODEL_WEIGHT", str, None)
    weights = None
    if weights_name:
        weights = folder / weights_name
        if not weights.is_file():
            hint = (f"; build it from the exported graph with {folder / 'build_engine.sh'} (docs/tensorrt.md)"
                    if engine == "tensorrt" else "")
            raise _err(path, "MODEL_WEIGHT", f"file {weights} does not exist{hint}")
    elif not is_custom(engine) and REGISTRY[engine].needs_weights:  # a user's engine decides for itself
        raise _err(path, "MODEL_WEIGHT", f"is missing; engine {engine!r} needs weights (a file in {folder})")

    weights_format = _weights_format(raw, path, weights, engine)
    config_file = None
    yaml_keys: dict[str, Any] = {}
    spec = None
    cfg_name = _get(raw, path, "CONFIG_FILE", str, None)
    if cfg_name:
        config_file = folder / cfg_name
        if not config_file.is_file():
            raise _err(path, "CONFIG_FILE", f"file {config_file} does not exist")
    if weights_format == "detectron2":
        spec = _detectron2_spec(raw, path, config_file)
        if engine == "torchvision":
            engine = "detectron2"  # the reference engine for detectron2 weights: DefaultPredictor's answers
    elif engine == "detectron2":
        raise _err(path, "ENGINE", f"engine 'detectron2' serves detectron2 weights; {weights} has torchvision's "
                   "parameter names (set WEIGHTS_FORMAT if that guess is wrong)")
    elif config_file is not None and config_file.suffix in (".yaml", ".yml"):
        yaml_keys = _read_detectron2_yaml(config_file)

    categories = _read_categories(folder, path, raw)
    if spec is not None:
        _check_detectron2_fit(raw, path, spec, kind, categories)
        yaml_keys = {"min_size": spec.min_size_test, "max_size": spec.max_size_test}
    min_size = _positive_int(raw, path, "MIN_SIZE", yaml_keys.get("min_size", 800), 8192)
    max_size = _positive_int(raw, path, "MAX_SIZE", yaml_keys.get("max_size", max(1333, min_size)), 16384)
    if max_size < min_size:
        raise _err(path, "MAX_SIZE", f"({max_size}) must be at least MIN_SIZE ({min_size})")
    score = _get(raw, path, "SCORE_THRESH_TEST", float, spec.score_thresh_test if spec else 0.5)
    if not (0.0 <= score <= 1.0) or math.isnan(score):
        raise _err(path, "SCORE_THRESH_TEST", f"must be in [0, 1], got {score}")
    mask_thr = _get(raw, path, "MASK_THRESHOLD", float, 0.5)
    if not (0.0 < mask_thr < 1.0):
        raise _err(path, "MASK_THRESHOLD", f"must be in (0, 1), got {mask_thr}")
    max_batch = _positive_int(raw, path, "MAX_BATCH_SIZE", 4, 256)
    # 0 by default, as in Triton: a busy engine batches what queued meanwhile, and an idle one
    # should not make a lone request wait for company.
    delay = _get(raw, path, "MAX_QUEUE_DELAY_MS", float, 0.0)
    if not 0.0 <= delay <= 10_000:
        raise _err(path, "MAX_QUEUE_DELAY_MS", f"must be in [0, 10000] milliseconds, got {delay}")
    per_device = _positive_int(raw, path, "INSTANCES_PER_DEVICE", 1, 64)
    devices = _parse_devices(raw.get("DEVICES", "auto"), path)

    if spec is not None:
        arch = _detectron2_architecture(spec)
        rgb_mean, rgb_std = spec.rgb_mean_std()
        mean = [v / 255.0 for v in rgb_mean[:3]]
        std = [v / 255.0 for v in rgb_std[:3]]
        depth_mean = rgb_mean[3] if spec.channels == 4 else 2.0
        depth_std = rgb_std[3] if spec.channels == 4 else 1.0
    else:
        arch = _architecture(raw, path, yaml_keys)
        mean, std = _pixel_normalisation(raw, path, yaml_keys)
        depth_mean = _get(raw, path, "DEPTH_MEAN", float, 2.0)
        depth_std = _get(raw, path, "DEPTH_STD", float, 1.0)
        if depth_std <= 0:
            raise _err(path, "DEPTH_STD", f"must be positive (metres), got {depth_std}")
    depth_fill = _get(raw, path, "DEPTH_FILL", float, None)
    depth_unit = _get(raw, path, "DEPTH_UNIT", float, 0.001)
    if not (depth_unit > 0 and math.isfinite(depth_unit)):
        raise _err(path, "DEPTH_UNIT", f"must be a positive number of metres per stored unit (0.001 for "
                   f"millimetres), got {depth_unit}")
    options = _get(raw, path, "ENGINE_OPTIONS", dict, {})
    if not is_custom(engine):  # a user's engine declares its options on its class: checked where it is loaded
        check_options(engine, REGISTRY[engine].options, options, str(path))

    return ModelConfig(
        name=name or folder.name,
        folder=folder,
        config_path=path.resolve(),
        detection_type=dtype,
        engine=engine,
        input_kind=kind,
        weights=weights,
        config_file=config_file,
        categories=categories,
        min_size=min_size,
        max_size=max_size,
        score_threshold=score,
        mask_threshold=mask_thr,
        max_batch_size=max_batch,
        max_queue_delay_ms=delay,
        instances_per_device=per_device,
        devices=devices,
        architecture=arch,
        pixel_mean=tuple(float(v) for v in mean),
        pixel_std=tuple(float(v) for v in std),
        depth_mean_m=depth_mean,
        depth_std_m=depth_std,
        depth_fill_m=depth_fill,
        depth_unit_m=depth_unit,
        engine_options=options,
        weights_format=weights_format,
        detectron2=spec,
    )


def _architecture(raw: dict[str, Any], path: Path, yaml_keys: dict[str, Any]) -> dict[str, Any]:
    """ARCHITECTURE for torchvision-format weights: defaults, the YAML's depth, then the node_config's keys."""
    arch = dict(DEFAULT_ARCHITECTURE)
    if "backbone" in yaml_keys:
        arch["backbone"] = yaml_keys["backbone"]
    user_arch = _get(raw, path, "ARCHITECTURE", dict, {})
    unknown = set(user_arch) - set(DEFAULT_ARCHITECTURE)
    if unknown:
        raise _err(path, "ARCHITECTURE", f"unknown keys {sorted(unknown)}; allowed: {sorted(DEFAULT_ARCHITECTURE)}")
    arch.update(user_arch)
    if arch["backbone"] not in BACKBONES:
        raise _err(path, "ARCHITECTURE", f"backbone {arch['backbone']!r} is not one of {BACKBONES}")
    for k in ("fpn_channels", "box_head_dim", "mask_head_channels", "mask_head_layers", "max_detections"):
        if not isinstance(arch[k], int) or isinstance(arch[k], bool) or arch[k] < 1:
            raise _err(path, "ARCHITECTURE", f"{k} must be a positive integer, got {arch[k]!r}")
    return arch


def _pixel_normalisation(raw: dict[str, Any], path: Path, yaml_keys: dict[str, Any]) -> tuple[list, list]:
    """R, G, B mean and std in [0, 1] for torchvision-format weights."""
    if "pixel_mean_255" in yaml_keys and "PIXEL_MEAN" not in raw:
        mean = [v / 255.0 for v in yaml_keys["pixel_mean_255"]][:3]
        std = [v / 255.0 for v in yaml_keys["pixel_std_255"]][:3]
    else:
        mean = list(_get(raw, path, "PIXEL_MEAN", list, [0.485, 0.456, 0.406]))
        std = list(_get(raw, path, "PIXEL_STD", list, [0.229, 0.224, 0.225]))
    for key, vals in (("PIXEL_MEAN", mean), ("PIXEL_STD", std)):
        if len(vals) != 3 or not all(isinstance(v, (int, float)) for v in vals):
            raise _err(path, key, "must be 3 numbers for R, G, B in [0, 1] (depth has DEPTH_MEAN/DEPTH_STD)")
    if any(v <= 0 for v in std):
        raise _err(path, "PIXEL_STD", "values must be positive")
    return mean, std


def _weights_format(raw: dict[str, Any], path: Path, weights: Path | None, engine: str) -> str:
    """WEIGHTS_FORMAT, or the format the weights' parameter names show (read without unpickling)."""
    given = _get(raw, path, "WEIGHTS_FORMAT", str, "auto")
    if given not in WEIGHTS_FORMATS:
        raise _err(path, "WEIGHTS_FORMAT", f"must be one of {', '.join(WEIGHTS_FORMATS)}, got {given!r}")
    if engine in EXPORTED_ENGINES:
        return EXPORTED_ENGINES[engine]  # an exported graph: the export contract says how it was made
    if given != "auto":
        return given
    if weights is None or is_custom(engine) or not REGISTRY[engine].needs_weights:
        return "torchvision"
    from dd.models.detectron2.checkpoint import sniff_weights_format

    return sniff_weights_format(weights) or "torchvision"


def _detectron2_spec(raw: dict[str, Any], path: Path, config_file: Path | None) -> "Detectron2Spec":
    """The detectron2 YAML that goes with detectron2 weights, read and validated."""
    if config_file is None or config_file.suffix not in (".yaml", ".yml"):
        raise _err(path, "CONFIG_FILE", "detectron2 weights need the YAML config they were trained with "
                   "(detectron2's cfg.dump(), or the file with its _BASE_ files) as CONFIG_FILE")
    for key, instead in _YAML_DECIDES.items():
        if key in raw:
            raise _err(path, key, f"does not apply to a detectron2 model: its YAML ({config_file.name}) decides "
                       f"({instead}); remove the key")
    from dd.models.detectron2.config import read_detectron2_yaml

    return read_detectron2_yaml(config_file)


def _check_detectron2_fit(raw: dict[str, Any], path: Path, spec: "Detectron2Spec", kind: str,
                          categories: tuple[str, ...]) -> None:
    """The node_config and the YAML must describe the same model: input channels and classes."""
    if spec.input_kind != kind:
        want = "RGBDMaskRCNNTorchServicer" if spec.input_kind == "rgbd" else "RGBMaskRCNNTorchServicer"
        what = "4 values (color + depth): an RGB-D model" if spec.channels == 4 else "3 values: an RGB model"
        raise _err(path, "DETECTION_TYPE", f"serves {kind.upper()} input, but MODEL.PIXEL_MEAN in {spec.source} has "
                   f"{what}; use {want} (or fix the YAML)")
    if len(categories) != spec.num_classes:
        key = "CATEGORIES" if "CATEGORIES" in raw else "CATEGORY_FILE"
        raise _err(path, key, f"lists {len(categories)} categories but MODEL.ROI_HEADS.NUM_CLASSES in {spec.source} "
                   f"is {spec.num_classes}; they must be equal (one name per class, in training order)")


def _detectron2_architecture(spec: "Detectron2Spec") -> dict[str, Any]:
    """ARCHITECTURE's keys filled from a detectron2 spec, for display (the network is built from the spec)."""
    return dict(DEFAULT_ARCHITECTURE, backbone=f"resnet{spec.depth}", fpn_channels=spec.fpn_out_channels,
                box_head_dim=spec.box_fc_dim, mask_head_channels=spec.mask_conv_dim,
                mask_head_layers=spec.mask_num_conv, max_detections=spec.detections_per_image)


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def _parse_devices(value: Any, path: Path) -> tuple[str, ...]:
    """DEVICES: "auto" (every GPU, else the CPU), "cpu", or a list of GPU indices."""
    if value == "auto" or value == "cpu":
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return tuple(str(v) for v in value)
    raise _err(path, "DEVICES", f'must be "auto", "cpu" or a list of GPU indices like [0, 1], got {value!r}')


def discover_models(path: Path | str) -> list[ModelConfig]:
    """Resolves what `serve PATH` was given: a node_config.json, a model folder, or a repository.

    A repository is a folder of model folders; each subfolder's name is its model's name.
    Models are returned sorted by name so that every process agrees on the order.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file or folder; give a model folder, its {NODE_CONFIG}, "
                          "or a folder of model folders")
    if path.is_file() or (path / NODE_CONFIG).is_file():
        models = [load_model_config(path)]
    else:
        subdirs = sorted(p for p in path.iterdir() if p.is_dir() and (p / NODE_CONFIG).is_file())
        if not subdirs:
            raise ConfigError(f"{path}: holds no {NODE_CONFIG} and no model folders with one")
        models = [load_model_config(p, name=p.name) for p in subdirs]
    for m in models:
        if not _NAME_RE.match(m.name):
            raise ConfigError(f"{m.folder}: model name {m.name!r} must be letters, digits, '_', '.', '-' "
                              "(rename the folder)")
    return models


def default_model_name(models: Iterable[ModelConfig]) -> str:
    """The model an empty DetectRequest.model means: the only one, else one named like the demo's default."""
    models = list(models)
    if len(models) == 1:
        return models[0].name
    for preferred in ("default", "demo-rgbd", "rgbd"):
        for m in models:
            if m.name == preferred:
                return m.name
    return models[0].name


JPEG_DECODE_CHOICES = ("auto", "frontend", "worker")  # ServerConfig.jpeg_decode


@dataclass
class ServerConfig:
    """Process-level settings, from flags and an optional JSON/YAML file (flags win)."""

    host: str = "0.0.0.0"
    port: int = 50051
    # A second port that serves only the KServe v2 / Triton protocol (inference.GRPCInferenceService,
    # health and reflection), as Triton's own gRPC port does; 0: KServe only on `port`, beside the Detector.
    kserve_port: int = 0
    frontends: int = 0  # 0: from the number of cores
    ring_slots: int = 16
    slot_mb: float = 0.0  # 0: large enough for the biggest image allowed (max_image_pixels, RGB-D)
    max_image_pixels: int = 3840 * 2160
    run_dir: str = ""  # "" : $XDG_RUNTIME_DIR or /tmp, per user and port
    log_dir: str = ""  # "" : log to stderr
    max_message_mb: float = 64.0
    default_timeout_s: float = 30.0
    grace_s: float = 10.0
    max_inflight_per_worker: int = 0  # 0: 2 x MAX_BATCH_SIZE
    torch_threads: int = 0  # 0: OMP_NUM_THREADS if set, else the cores the worker is pinned to (dd.worker.server)
    log_level: str = "INFO"
    # Requests one frontend admits at once (waiting for a slot, decoding, or at a worker). Beyond it
    # a request is refused at once with RESOURCE_EXHAUSTED, so memory stays bounded under any load:
    # at most about max_pending x the request size is held per frontend.
    max_pending: int = 256
    # Security (docs/operations.md). Paths to PEM files; relative paths in a config file are
    # relative to that file. No TLS and no token by default.
    tls_cert: str = ""  # certificate chain; with tls_key, the port speaks TLS only
    tls_key: str = ""
    tls_client_ca: str = ""  # CA bundle: clients must present a certificate it signed (mutual TLS)
    auth_token_file: str = ""  # a file holding the bearer token every call but health must carry
    # Client system shared memory (KServe/Triton's SystemSharedMemoryRegister): local clients of the
    # server's own user may register POSIX shared-memory regions and pass tensors through them.
    allow_client_shm: bool = False
    # Limits against hostile and clumsy clients (docs/operations.md, "Limits"). Each bounds a cost
    # that one client could otherwise make every other client pay.
    max_jpeg_scans: int = 32  # scans of one JPEG (progressive ones have about 10); counted before decoding
    max_request_id_bytes: int = 256  # request_id is echoed in the response and may be logged
    stream_window: int = 8  # requests of one DetectStream in flight; at most half the ring (fair slots)
    max_held_response_mb: float = 256.0  # finished responses per frontend waiting for clients that do not read
    max_concurrent_calls: int = 512  # calls one frontend runs at once (more wait for their turn)
    max_streams_per_connection: int = 256  # HTTP/2 concurrent streams per connection
    max_connections: int = 1024  # connections per frontend; more are closed at once
    idle_timeout_s: float = 60.0  # a connection with no call for this long is closed (clients reconnect)
    handshake_timeout_s: float = 10.0  # a connection must finish its TLS/HTTP2 handshake this soon
    keepalive_s: float = 60.0  # ping clients with open calls this often; 20 s without an answer closes
    upload_timeout_s: float = 60.0  # a Detect request's message must have arrived this long after the call began
    # Logs: rotate each process's file under log_dir at this size (0: never; leave it to logrotate)
    log_max_mb: float = 0.0
    log_backups: int = 3
    # Workers are forked from one process that has imported torch and the engines (dd/zygote.py), so a
    # restarted worker skips its imports; false: each worker is a new interpreter.
    fork_workers: bool = True
    # Prometheus text at http://HOST:metrics_port/metrics (dd/metrics.py), summed over every process of
    # the run; 8002 as Triton's. 0: no endpoint, and no process records anything.
    metrics_port: int = 8002
    # Where a JPEG color image is decoded (docs/operations.md, "JPEG decoding"): "frontend" (CPU, the
    # pixels detectron2's CPU decode gives), "worker" (sent compressed through the ring; decoded on the
    # worker's GPU where its engine can, else on the worker's CPU), "auto": "worker" for a model whose
    # ready workers all decode JPEGs on a GPU, else "frontend". "frontend" by default: measured on an
    # H200, nvJPEG's pixels moved 3 of 205 confident detections of the demo model (BENCHMARKS.md, S6-9).
    jpeg_decode: str = "frontend"
    # Nice value of the frontend processes (0-19; 0: the supervisor's own). Higher: when every core is
    # busy, the worker threads that feed the GPUs run before the frontends' decoding.
    frontend_nice: int = 0
    # Parts one image may be decoded in at once, where its file allows (docs/operations.md, "Decoding in
    # parts"): 0 from the cores (up to 4, half the cores each for color and depth), 1 never.
    decode_parts: int = 0
    # At start, compile the fast engine's Triton kernels into Triton's cache in several processes while
    # the zygote imports (dd/worker/engines/kernels/preload.py): a machine with an empty cache then
    # starts sooner; with a warm one it costs a lookup per kernel. Only where a fast-engine worker has a GPU.
    preload_kernels: bool = True

    def worker_credits(self, max_batch_size: int) -> int:
        """Requests one frontend may have at one worker at once: max_inflight_per_worker, else
        2 x the model's MAX_BATCH_SIZE (one batch running, one queued behind it)."""
        return self.max_inflight_per_worker if self.max_inflight_per_worker > 0 else 2 * max_batch_size

    def resolved_frontends(self, workers: int = 1) -> int:
        """`frontends`, or from the cores this process may use: half of them, less one per worker beyond
        the first, 1 to 32. Decoding and request handling are the frontends' CPU work, and a frontend's
        Python is one core at most, but frontends also take cores from the workers that keep the GPUs
        fed: on an H200 host (16 cores, one worker, JPEG+PNG at concurrency 64) 4 frontends served 198
        images/s (S7-4), 8 served 394, 12 375 and 16 only 298, in batches of 12 instead of 16
        (BENCHMARKS.md, session 9)."""
        if self.frontends > 0:
            return self.frontends
        if self.unix_socket():
            return 1  # a socket file is one process's: frontends cannot share it as they share a TCP port
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux
            cores = os.cpu_count() or 2
        return max(1, min(32, cores // 2 - max(workers, 1) + 1))

    def unix_socket(self) -> bool:
        """`host` is a Unix socket (unix:PATH): gRPC listens on that file, and `port` is not used."""
        return self.host.startswith("unix:")

    def listen_address(self, port: int | None = None) -> str:
        """What gRPC listens on: HOST:PORT (`port` by default), or the unix:PATH itself."""
        return self.host if self.unix_socket() else f"{self.host}:{self.port if port is None else port}"

    def listen_ports(self) -> list[tuple[str, int]]:
        """(flag, port) of each port the frontends listen on, for messages and checks (dd.listen_address);
        a Unix socket is its file alone (port 0, unused)."""
        if self.unix_socket():
            return [("--host", 0)]
        return [(flag, port) for flag, port in (("--port", self.port), ("--kserve-port", self.kserve_port)) if port]

    def slot_bytes(self) -> int:
        """One ring slot holds one color image (3 bytes a pixel) and one depth image (up to 4)."""
        if self.slot_mb > 0:
            return int(self.slot_mb * 1024 * 1024)
        return self.max_image_pixels * (3 + 2) + 4096

    def resolved_run_dir(self) -> Path:
        if self.run_dir:
            return Path(self.run_dir)
        base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
        return Path(base) / f"deep-detection-{os.getuid()}-{self.port}"

    def validate(self) -> None:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"port must be in [0, 65535], got {self.port}")
        if not 0 <= self.metrics_port <= 65535:
            problems.append(f"metrics_port must be in [0, 65535] (0: no metrics), got {self.metrics_port}")
        elif self.metrics_port and self.metrics_port == self.port:
            problems.append(f"metrics_port {self.metrics_port} is the gRPC port too; give --metrics-port another "
                            "port, or 0 for no metrics")
        if not 0 <= self.kserve_port <= 65535:
            problems.append(f"kserve_port must be in [0, 65535] (0: KServe on the main port only), got {self.kserve_port}")
        elif self.kserve_port and self.kserve_port == self.port:
            problems.append(f"kserve_port {self.kserve_port} is the main port, which serves KServe already; give "
                            "another port, or 0")
        if self.frontends < 0:
            problems.append("frontends must be >= 0 (0: from the cores)")
        if self.unix_socket() and self.frontends > 1:
            problems.append(f"a Unix socket ({self.host}) is served by one frontend (frontends share a TCP port, not a "
                            f"socket file), got frontends {self.frontends}: give --frontends 1, or a TCP --host such "
                            "as 127.0.0.1 for more")
        if self.unix_socket() and self.kserve_port:
            problems.append(f"kserve_port is a TCP port, and the host is a Unix socket ({self.host}): the socket "
                            "serves KServe v2 already; leave --kserve-port out")
        if not 1 <= self.ring_slots <= 4096:
            problems.append(f"ring_slots must be in [1, 4096], got {self.ring_slots}")
        if self.max_message_mb <= 0:
            problems.append("max_message_mb must be positive")
        if self.default_timeout_s <= 0 or self.grace_s < 0:
            problems.append("default_timeout_s must be positive and grace_s non-negative")
        if self.max_image_pixels < 4:
            problems.append("max_image_pixels must be at least 4 (2 x 2)")
        if self.max_pending < 1:
            problems.append("max_pending must be at least 1")
        if self.max_inflight_per_worker < 0:
            problems.append("max_inflight_per_worker must be >= 0 (0: 2 x MAX_BATCH_SIZE)")
        if not 0 <= self.decode_parts <= 16:
            problems.append(f"decode_parts must be in [0, 16] (0: from the cores, 1: never split), got {self.decode_parts}")
        if not 0 <= self.frontend_nice <= 19:
            problems.append(f"frontend_nice must be in [0, 19] (0: as the supervisor), got {self.frontend_nice}")
        if self.jpeg_decode not in JPEG_DECODE_CHOICES:
            problems.append(f"jpeg_decode must be one of {', '.join(JPEG_DECODE_CHOICES)}, got {self.jpeg_decode!r}")
        problems += self._limit_problems()
        problems += self._security_problems()
        if problems:
            raise ConfigError("server configuration: " + "; ".join(problems))

    def _limit_problems(self) -> list[str]:
        problems = []
        for key in ("max_jpeg_scans", "max_request_id_bytes", "stream_window", "max_concurrent_calls",
                    "max_streams_per_connection", "max_connections"):
            if getattr(self, key) < 1:
                problems.append(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("max_held_response_mb", "idle_timeout_s", "handshake_timeout_s", "keepalive_s",
                    "upload_timeout_s"):
            if getattr(self, key) <= 0:
                problems.append(f"{key} must be positive, got {getattr(self, key)}")
        if self.log_max_mb < 0 or self.log_backups < 0:
            problems.append("log_max_mb and log_backups must be >= 0 (log_max_mb 0: never rotate)")
        return problems

    def resolved_stream_window(self) -> int:
        """Requests of one DetectStream in flight: stream_window, but at most half the ring, so that one
        stream can never hold every slot of its frontend (other callers always find one)."""
        return max(1, min(self.stream_window, self.ring_slots // 2))

    def _security_problems(self) -> list[str]:
        problems = []
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("tls_cert and tls_key go together (--tls-cert and --tls-key): give both or neither")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("tls_client_ca (mutual TLS) needs tls_cert and tls_key as well")
        for key in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, key)
            if not path:
                continue
            try:
                head = Path(path).read_bytes()[:1 << 16]
            except OSError as exc:
                problems.append(f"{key}: cannot read {path} ({exc.strerror})")
                continue
            if b"-----BEGIN" not in head:
                problems.append(f"{key}: {path} is not a PEM file (no '-----BEGIN' line)")
        if self.auth_token_file and not Path(self.auth_token_file).is_file():
            problems.append(f"auth_token_file: {self.auth_token_file} does not exist; put the token in a file "
                            "readable only by the server's user (chmod 600)")
        return problems


_PATH_SETTINGS = ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file")


def load_server_config(path: Path | str | None, overrides: dict[str, Any]) -> ServerConfig:
    """File values first, then every override that is not None (the command-line flags)."""
    values: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: server config file does not exist")
        text = p.read_text()
        try:
            if p.suffix in (".yaml", ".yml"):
                import yaml

                values = yaml.safe_load(text) or {}
            else:
                values = json.loads(text)
        except Exception as exc:  # noqa: BLE001 - parser errors differ by format
            raise ConfigError(f"{p}: cannot parse: {exc}") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"{p}: must hold a mapping of settings")
        allowed = {f.name for f in fields(ServerConfig)}
        unknown = set(values) - allowed
        if unknown:
            raise ConfigError(f"{p}: unknown settings {sorted(unknown)}; allowed: {sorted(allowed)}")
        base = p.resolve().parent
        for key in _PATH_SETTINGS:  # relative to the file that names them
            if isinstance(values.get(key), str) and values[key] and not os.path.isabs(values[key]):
                values[key] = str(base / values[key])
    values.update({k: v for k, v in overrides.items() if v is not None})
    for key in _PATH_SETTINGS:  # absolute, so every child process reads the same file
        if isinstance(values.get(key), str) and values[key]:
            values[key] = os.path.abspath(values[key])
    cfg = ServerConfig()
    for f in fields(ServerConfig):
        if f.name in values:
            setattr(cfg, f.name, _setting(f.name, type(getattr(cfg, f.name)), values[f.name]))
    cfg.validate()
    return cfg


def _setting(name: str, want: type, v: Any) -> Any:
    """One setting converted to its type, strictly: no booleans as numbers, no 2.5 as an integer, no NaN."""
    bad = ConfigError(f"server setting {name}: expected {'a number' if want is float else want.__name__}, got {v!r}")
    if want is bool:  # a switch: true or false, nothing that merely looks like one
        if not isinstance(v, bool):
            raise ConfigError(f"server setting {name}: expected true or false, got {v!r}")
        return v
    if isinstance(v, bool) or (want is not str and isinstance(v, (list, dict))):
        raise bad
    try:
        if want is int:
            if isinstance(v, float) and not v.is_integer():
                raise bad
            return int(v)
        if want is float:
            out = float(v)
            if not math.isfinite(out):
                raise bad
            return out
        if not isinstance(v, (str, int, float)):
            raise bad
        return str(v)
    except (TypeError, ValueError, OverflowError):
        raise bad from None
