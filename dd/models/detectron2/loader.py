"""A detectron2 model folder's weights, read, converted and loaded into the network its YAML describes."""

from __future__ import annotations

import logging
from pathlib import Path

from torchvision.models.detection import MaskRCNN

from dd.models.detectron2.checkpoint import read_weights
from dd.models.detectron2.config import Detectron2Spec
from dd.models.detectron2.convert import convert_state_dict
from dd.models.detectron2.network import build_network
from dd.models.no_random_init import skip_random_init

log = logging.getLogger(__name__)


def load_detectron2_model(spec: Detectron2Spec, weights: Path | str, *, score_threshold: float | None = None,
                          min_size: int | None = None, max_size: int | None = None) -> MaskRCNN:
    """The network of `spec` with the detectron2 weights in `weights` (any of checkpoint.py's containers),
    in eval mode on the CPU. score_threshold / min_size / max_size override the YAML's (node_config's keys)."""
    found = read_weights(weights)
    for note in found.notes:
        log.info("%s: %s", weights, note)
    with skip_random_init():  # the strict load below overwrites every value: no random draws first
        model = build_network(spec)
    state = convert_state_dict(found.state, spec, model.state_dict(), source=str(weights))
    model.load_state_dict(state, strict=True)
    if score_threshold is not None:
        model.roi_heads.score_thresh = score_threshold
    if min_size is not None:
        model.transform.min_size = (min_size,)
    if max_size is not None:
        model.transform.max_size = max_size
    return model.eval()
