"""The network a model config describes, with its weights: built once here for every engine that runs them.

Engines import this rather than each other (the fast engine builds the same network as the
torchvision engine, then rewrites it for speed).
"""

from __future__ import annotations

from torchvision.models.detection import MaskRCNN

from dd.config import ModelConfig
from dd.models.maskrcnn import build_maskrcnn, load_state_dict
from dd.models.no_random_init import skip_random_init


def build_loaded_model(cfg: ModelConfig) -> MaskRCNN:
    """The model a config describes, with its weights; shared by every engine that runs these weights.

    detectron2 weights (cfg.detectron2 set) give the torchvision-structured network of their YAML, with
    detectron2's rules where they differ (dd.models.detectron2.network; model.semantics says which).
    """
    if cfg.detectron2 is not None:
        from dd.models.detectron2.loader import load_detectron2_model

        if cfg.weights is None:
            raise ValueError(f"model {cfg.name}: engine {cfg.engine!r} needs MODEL_WEIGHT")
        return load_detectron2_model(cfg.detectron2, cfg.weights, score_threshold=cfg.score_threshold,
                                     min_size=cfg.min_size, max_size=cfg.max_size)
    mean = list(cfg.pixel_mean)
    std = list(cfg.pixel_std)
    if cfg.input_kind == "rgbd":
        mean.append(cfg.depth_mean_m)
        std.append(cfg.depth_std_m)
    if cfg.weights is None:
        raise ValueError(f"model {cfg.name}: engine {cfg.engine!r} needs MODEL_WEIGHT")
    with skip_random_init():  # every value is overwritten below, or the load fails: no random draws first
        model = build_maskrcnn(cfg.architecture, cfg.num_classes, cfg.channels, cfg.min_size, cfg.max_size,
                               mean, std, cfg.score_threshold)
    state = load_state_dict(cfg.weights)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches: torch lists every one, over many lines
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        raise ValueError(
            f"{cfg.weights}: tensor shapes do not fit the architecture {cfg.architecture} with "
            f"{cfg.num_classes - 1} categories and {cfg.channels} input channels ({len(lines)} mismatch(es), e.g. "
            f"{(lines[0] if lines else str(exc).splitlines()[0]).rstrip('.')}). Check ARCHITECTURE, CATEGORY_FILE and "
            "DETECTION_TYPE in node_config.json.") from exc
    if missing or unexpected:
        raise ValueError(
            f"{cfg.weights}: does not fit the architecture {cfg.architecture} with {cfg.num_classes - 1} "
            f"categories and {cfg.channels} input channels (missing {len(missing)} keys, e.g. {missing[:3]}; "
            f"unexpected {len(unexpected)}, e.g. {unexpected[:3]}). Check ARCHITECTURE, CATEGORY_FILE and "
            "DETECTION_TYPE in node_config.json."
        )
    return model
