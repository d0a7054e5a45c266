"""What the server understood of a model folder, in words: `deep-detection inspect FOLDER`.

A user checks a folder before deploying it: which weights and in which format, the
network, the input channels and their order and normalisation, the resize rule,
the classes, the thresholds, the engine, and which values came from where
(node_config.json, the YAML, detectron2's defaults). The weights are read and
fitted to the network (nothing is run), so a folder that inspects cleanly loads.
"""

from __future__ import annotations

import json
from typing import Any

from dd.config import ModelConfig
from dd.config.engines import REGISTRY


def _fmt(values: Any) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _source(raw: dict[str, Any], key: str, yaml_key: str | None, spec: Any) -> str:
    if key in raw:
        return "node_config.json"
    if spec is not None and yaml_key is not None:
        return "detectron2's default" if yaml_key in spec.defaulted else "YAML"
    return "default"


def check_weights(cfg: ModelConfig) -> str:
    """Reads the weights and loads them into the network (nothing runs); returns what was found.
    Raises ConfigError (or ValueError) saying what does not fit."""
    if cfg.weights is None:
        return "none"
    if cfg.engine in ("onnxruntime", "tensorrt"):
        from dd.models.graph_layout import GraphContract

        c = GraphContract.read(cfg.folder)
        return (f"{c.format} export ({cfg.weights.stat().st_size / 1e6:.1f} MB), not loaded here: export.json "
                f"describes it")
    if cfg.detectron2 is not None:
        from dd.models.detectron2.checkpoint import read_weights
        from dd.models.detectron2.convert import convert_state_dict
        from dd.models.detectron2.network import build_network

        found = read_weights(cfg.weights)
        model = build_network(cfg.detectron2)
        model.load_state_dict(convert_state_dict(found.state, cfg.detectron2, model.state_dict(),
                                                 source=str(cfg.weights)))
        notes = "".join(f"; {n}" for n in found.notes)
        return f"{found.container}, {len(found.state)} tensors, fit the YAML's network{notes}"
    from dd.models.build import build_loaded_model

    build_loaded_model(cfg)
    return "state dict, fits the architecture"


def describe(cfg: ModelConfig, weights_check: str) -> list[str]:
    """The lines `inspect` prints for one model."""
    raw = json.loads(cfg.config_path.read_text())
    spec = cfg.detectron2
    lines = [f"model {cfg.name}: {cfg.folder}"]
    lines.append(f"  engine: {_engine_words(cfg.engine)}; DETECTION_TYPE {cfg.detection_type}")
    if cfg.weights is not None:
        how = "WEIGHTS_FORMAT" if "WEIGHTS_FORMAT" in raw else "recognised by its parameter names"
        if cfg.engine in ("onnxruntime", "tensorrt"):
            how = f"the {cfg.engine} engine's"
        lines.append(f"  weights: {cfg.weights.name}: {cfg.weights_format} format ({how}); {weights_check}")
    if cfg.config_file is not None:
        lines.append(f"  config: {cfg.config_file.name}" + (" (detectron2 YAML, _BASE_ resolved, detectron2's "
                                                            "defaults for keys it leaves out)" if spec else ""))
    if cfg.engine in ("onnxruntime", "tensorrt"):
        lines += _exported_lines(cfg)
    elif spec is not None:
        lines += _detectron2_lines(cfg, raw)
    else:
        lines += _torchvision_lines(cfg, raw)
    names = ", ".join(f"{i + 1} {c}" for i, c in enumerate(cfg.categories))
    lines.append(f"  classes ({len(cfg.categories)}): {names}")
    lines.append(f"  batching: up to {cfg.max_batch_size} images, queue delay {cfg.max_queue_delay_ms:g} ms; "
                 f"devices {', '.join(cfg.devices)}, {cfg.instances_per_device} worker(s) each")
    return lines


def _exported_lines(cfg: ModelConfig) -> list[str]:
    from dd.models.graph_layout import GraphContract

    c = GraphContract.read(cfg.folder)
    kind = "R, G, B, depth in metres" if c.channels == 4 else "R, G, B"
    fill = "" if c.channels == 3 else (f"; missing depth becomes {c.depth_fill_m:g} m" if c.depth_fill_m is not None
                                       else "; missing depth stays 0")
    return [f"  graph: {c.format}, input canvas {c.height}x{c.width} (HxW), batch "
            f"{'dynamic' if c.dynamic_batch else c.batch}, {c.semantics}'s rules; exported from "
            f"{c.source.get('folder', '?')}",
            f"  input: {kind}, (x * {c.input_scale:g} - mean {_fmt(c.mean)}) / std {_fmt(c.std)}{fill}",
            f"  resize: shorter side {cfg.min_size}, longer at most {cfg.max_size}, then fitted to the canvas",
            f"  thresholds: score {cfg.score_threshold:g}" + (f" (at least {c.score_threshold:g}: baked into the "
                                                              "TensorRT engine)" if c.format == "tensorrt-onnx"
                                                              else "") + f", mask {cfg.mask_threshold:g}; "
            f"up to {c.max_detections} detections"]


def _detectron2_lines(cfg: ModelConfig, raw: dict[str, Any]) -> list[str]:
    spec = cfg.detectron2
    assert spec is not None
    block = "BasicBlock" if spec.depth in (18, 34) else (
        f"Bottleneck {spec.num_groups}x{spec.width_per_group}, stride in the "
        f"{'1x1' if spec.stride_in_1x1 else '3x3'} conv")
    levels = ", ".join(spec.fpn_levels)
    lines = [
        f"  backbone: ResNet-{spec.depth} ({block}; stem {spec.stem_out_channels}, res2 {spec.res2_out_channels} "
        f"channels; {spec.resnet_norm} norms, frozen at inference) + FPN {spec.fpn_out_channels} channels on "
        f"{', '.join(spec.fpn_in_features)} -> {levels} (p{spec.fpn_levels[-1][1:]} by max pool)",
    ]
    order = ", ".join(spec.channel_order)
    lines.append(f"  input: {spec.channels} channels {order} (INPUT.FORMAT {spec.input_format}; the server feeds "
                 f"R, G, B{', D' if spec.channels == 4 else ''} and reorders the stem to match)")
    lines.append(f"  normalisation: (x - MODEL.PIXEL_MEAN) / MODEL.PIXEL_STD, mean {_fmt(spec.pixel_mean)}, std "
                 f"{_fmt(spec.pixel_std)} ({order}; color in 0-255" + (", depth in metres)" if spec.channels == 4
                                                                         else ")"))
    if spec.channels == 4:
        fill = ("missing (0) stays 0" if cfg.depth_fill_m is None
                else f"missing (0) becomes {cfg.depth_fill_m:g} m (DEPTH_FILL)")
        lines.append(f"  depth: 16-bit images x {cfg.depth_unit_m:g} m ({_source(raw, 'DEPTH_UNIT', None, None)} "
                     f"DEPTH_UNIT), float32 images as metres; {fill}")
    interp = ("as one float32 4-channel image, bilinear (F.interpolate)" if spec.channels == 4
              else "uint8 with PIL's bilinear filter")
    lines.append(f"  resize: shorter side to {cfg.min_size} ({_source(raw, 'MIN_SIZE', 'INPUT.MIN_SIZE_TEST', spec)}), "
                 f"longer at most {cfg.max_size} ({_source(raw, 'MAX_SIZE', 'INPUT.MAX_SIZE_TEST', spec)}), "
                 f"rounded half up, {interp}; padded with zeros to a multiple of 32")
    sizes = " ".join(_fmt(s) for s in spec.anchor_sizes)
    lines.append(f"  RPN: anchors {sizes} x ratios {_fmt(spec.anchor_aspect_ratios[0])}, offset "
                 f"{spec.anchor_offset:g}; top {spec.rpn_pre_nms_topk_test} per level, NMS {spec.rpn_nms_thresh:g}, "
                 f"{spec.rpn_post_nms_topk_test} proposals")
    fc = f"{spec.box_num_conv} conv x {spec.box_conv_dim}, {spec.box_num_fc} fc x {spec.box_fc_dim}"
    pool = lambda aligned, res, sr: (f"{'ROIAlignV2' if aligned else 'ROIAlign'} {res}x{res}, "  # noqa: E731
                                     f"sampling {sr or 'adaptive'}")
    box_pool = pool(spec.box_pooler_aligned, spec.box_pooler_resolution, spec.box_pooler_sampling_ratio)
    mask_pool = pool(spec.mask_pooler_aligned, spec.mask_pooler_resolution, spec.mask_pooler_sampling_ratio)
    lines.append(f"  box head: {box_pool}"
                 f" on {', '.join(spec.roi_in_features)}; {fc}; "
                 f"{'class-agnostic' if spec.cls_agnostic_bbox_reg else 'class-specific'} boxes")
    lines.append(f"  mask head: {mask_pool};"
                 f" {spec.mask_num_conv} conv x {spec.mask_conv_dim}; "
                 f"{'class-agnostic' if spec.cls_agnostic_mask else 'class-specific'} masks")
    lines.append(f"  thresholds: score > {cfg.score_threshold:g} "
                 f"({_source(raw, 'SCORE_THRESH_TEST', 'MODEL.ROI_HEADS.SCORE_THRESH_TEST', spec)}; a request may "
                 f"set its own), class-wise NMS {spec.nms_thresh_test:g}, up to {spec.detections_per_image} detections,"
                 f" mask >= {cfg.mask_threshold:g}")
    if spec.defaulted:
        lines.append(f"  detectron2's defaults used for: {', '.join(spec.defaulted)}")
    if spec.ignored:
        lines.append(f"  ignored (not detectron2 keys): {', '.join(spec.ignored)}")
    return lines


def _torchvision_lines(cfg: ModelConfig, raw: dict[str, Any]) -> list[str]:
    arch = cfg.architecture
    lines = [f"  network: torchvision Mask R-CNN, {arch['backbone']} + FPN {arch['fpn_channels']} channels, box head "
             f"{arch['box_head_dim']}, mask head {arch['mask_head_layers']} x {arch['mask_head_channels']}"]
    order = "R, G, B, D" if cfg.input_kind == "rgbd" else "R, G, B"
    lines.append(f"  input: {cfg.channels} channels {order}; color / 255 normalised with mean "
                 f"{_fmt(cfg.pixel_mean)}, std {_fmt(cfg.pixel_std)}")
    if cfg.input_kind == "rgbd":
        lines.append(f"  depth: 16-bit images x {cfg.depth_unit_m:g} m, float32 as metres; missing (0) becomes "
                     f"{cfg.depth_fill:g} m; normalised with mean {cfg.depth_mean_m:g} m, std {cfg.depth_std_m:g} m")
    lines.append(f"  resize: torchvision's (shorter side to {cfg.min_size}, longer at most {cfg.max_size}, bilinear)")
    lines.append(f"  thresholds: score >= {cfg.score_threshold:g} ({_source(raw, 'SCORE_THRESH_TEST', None, None)}), "
                 f"up to {arch['max_detections']} detections, mask >= {cfg.mask_threshold:g}")
    return lines


def _engine_words(engine: str) -> str:
    """The registry's one line about an engine, or its name (a user's "package.module:ClassName")."""
    spec = REGISTRY.get(engine)
    return spec.description if spec is not None and spec.description else engine
