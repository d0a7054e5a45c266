"""The users' detectron2 folders answer as detectron2 does: in-process on the CPU engine, and served.

Why: the users trained their Mask R-CNNs with detectron2 (RGB and 4-channel RGB-D); the server is only
useful to them if it gives detectron2's answers for their folders as they are (trainer checkpoint or
model-zoo .pkl, a YAML with `_BASE_`, node_config.json with the seed's keys). The reference answers were
made by real detectron2 (scripts/make_detectron2_fixtures.py) and are stored beside small models in
tests/fixtures/detectron2/, so detectron2 is not needed here. The bounds are issue #13's (tests/parity.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests import parity
from tests.serverproc import ServerProcess

FIXTURES = parity.DETECTRON2_FIXTURES
MODELS = sorted(p.name for p in FIXTURES.iterdir() if (p / "node_config.json").is_file())
SEED_KEYS = {"DETECTION_TYPE", "MODEL_WEIGHT", "CONFIG_FILE", "MIN_SIZE", "SCORE_THRESH_TEST", "CATEGORY_FILE"}


def _folder(name: str, variant: str, tmp_path: Path) -> Path:
    """The fixture folder as committed, or a copy whose CONFIG_FILE is detectron2's dumped config
    (cfg.dump(): every key spelled out, no _BASE_), the other form users ship."""
    folder = FIXTURES / name
    if variant == "yaml":
        return folder
    copy = tmp_path / name
    shutil.copytree(folder, copy)
    shutil.copytree(FIXTURES / "images", tmp_path / "images")  # expected.json refers to ../images
    node = json.loads((copy / "node_config.json").read_text())
    node["CONFIG_FILE"] = "config_dump.yaml"
    (copy / "node_config.json").write_text(json.dumps(node))
    return copy


def test_fixtures_are_users_folders_with_nontrivial_answers() -> None:
    """The fixtures are what they claim: the seed's keys only, both input kinds, a trainer checkpoint and
    a model-zoo .pkl, and reference answers worth comparing against (several detections per image,
    scores spread over the threshold range, masks that neither vanish nor fill their boxes)."""
    from pycocotools import mask as mask_util

    kinds, weights = set(), set()
    for name in MODELS:
        folder = FIXTURES / name
        node = json.loads((folder / "node_config.json").read_text())
        assert set(node) == SEED_KEYS, f"{name}: node_config keys {sorted(node)}"
        kinds.add(node["DETECTION_TYPE"])
        weights.add(Path(node["MODEL_WEIGHT"]).suffix)
        assert "_BASE_" in (folder / node["CONFIG_FILE"]).read_text()
        expected = json.loads((folder / "expected.json").read_text())
        assert expected["score_threshold"] == node["SCORE_THRESH_TEST"]
        counts, scores, fill = [], [], []
        for img in expected["images"]:
            det = img["detections"]
            counts.append(len(det["scores"]))
            scores += det["scores"]
            for box, rle in zip(det["boxes"], det["masks"]):
                area = (box[2] - box[0]) * (box[3] - box[1])
                fill.append(mask_util.area({"size": rle["size"], "counts": rle["counts"].encode()}) / max(area, 1.0))
            assert det["class_ids"] == [c + 1 for c in det["classes"]]
        assert min(counts) >= 2 and sum(counts) >= 20, f"{name}: detections per image {counts}"
        assert max(scores) > 0.95 and min(scores) < node["SCORE_THRESH_TEST"] + 0.1, f"{name}: scores not spread"
        assert 0.2 < float(np.median(fill)) < 0.95, f"{name}: median mask/box area {np.median(fill):.2f}"
    assert kinds == {"RGBMaskRCNNTorchServicer", "RGBDMaskRCNNTorchServicer"}
    assert {".pth", ".pkl"} <= weights


@pytest.mark.parametrize("variant", ["yaml", "dumped"])
@pytest.mark.parametrize("name", MODELS)
def test_cpu_engine_answers_as_detectron2(name: str, variant: str, tmp_path: Path) -> None:
    from dd.config import load_model_config
    from dd.worker.engines import load_engine

    folder = _folder(name, variant, tmp_path)
    cfg = load_model_config(folder)
    expected, images = parity.expected_images(folder)
    assert cfg.score_threshold == expected["score_threshold"]  # node_config's value wins over the YAML's
    engine = load_engine(cfg, "cpu")
    try:
        got = parity.run_engine(engine, images, cfg.score_threshold)
    finally:
        engine.close()
    ref = [parity.from_expected(im.expected) for im in images]  # type: ignore[arg-type]
    metrics = parity.compare(ref, got, cfg.score_threshold, names=[im.name for im in images])
    bad = parity.failures(metrics)
    assert not bad, f"{name} ({variant}): {parity.summary(metrics)}\n" + "\n".join(bad)


def test_served_answers_match_detectron2() -> None:
    """The whole fixture repository served at once; every image sent as the PNG files a client has."""
    from dd.client import DetectorClient

    with ServerProcess(FIXTURES, frontends=1) as srv, DetectorClient(srv.target, timeout=120) as client:
        served = {m.name for m in client.list_models()}
        assert served == set(MODELS), served
        for name in MODELS:
            expected, images = parity.expected_images(FIXTURES / name)
            got = []
            for im in images:
                assert im.color_file is not None
                depth = im.depth_file.read_bytes() if im.depth_file is not None else None
                result = client.detect(im.color_file.read_bytes(), depth, model=name)
                assert result.model == name and not result.error_message, result.error_message
                got.append(parity.from_result(result))
            ref = [parity.from_expected(im.expected) for im in images]  # type: ignore[arg-type]
            metrics = parity.compare(ref, got, expected["score_threshold"], names=[im.name for im in images])
            bad = parity.failures(metrics)
            assert not bad, f"{name} served: {parity.summary(metrics)}\n" + "\n".join(bad)
