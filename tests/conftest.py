"""Shared fixtures: model folders with fixed random weights, and real servers on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.serverproc import ServerProcess


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository of two small torchvision models (RGB-D with 2 workers, RGB) and a null model."""
    # Imported here, not at the top: torch is needed only by the tests that use these models, and
    # .ci/run's lowest-pins environment runs a subset of tests without torch.
    from dd.models.model_folder import random_model_folder

    root = tmp_path_factory.mktemp("models")
    random_model_folder(root / "rgbd", input_kind="rgbd", seed=1, min_size=192, max_size=256,
                        extra={"MAX_BATCH_SIZE": 4, "INSTANCES_PER_DEVICE": 2})
    random_model_folder(root / "rgb", input_kind="rgb", seed=2, categories=["carton", "bag"], min_size=192,
                        max_size=256)
    null = root / "null"
    null.mkdir()
    (null / "categories.txt").write_text("a\nb\n")
    (null / "node_config.json").write_text(json.dumps({
        "DETECTION_TYPE": "RGBDNullServicer", "CATEGORY_FILE": "categories.txt", "SCORE_THRESH_TEST": 0.0,
        "ENGINE_OPTIONS": {"instances": 4}}))
    return root


@pytest.fixture(scope="session")
def server(model_repo: Path):
    """One server for the read-only tests: 2 frontends, 2 RGB-D workers, 1 RGB worker, 1 null worker."""
    with ServerProcess(model_repo, frontends=2) as srv:
        srv.wait_workers_ready({"rgbd": 2, "rgb": 1, "null": 1})  # health needs only one of rgbd's two
        yield srv


def scene(seed: int, h: int = 240, w: int = 320) -> tuple[np.ndarray, np.ndarray]:
    """A color + depth pair with structure (rectangles at different depths), different for each seed."""
    rng = np.random.default_rng(seed)
    color = np.full((h, w, 3), rng.integers(60, 200, 3), np.uint8)
    depth = np.full((h, w), 2500, np.uint16)
    for _ in range(6):
        x, y = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 60))
        bw, bh = int(rng.integers(30, 90)), int(rng.integers(30, 90))
        color[y:y + bh, x:x + bw] = rng.integers(0, 255, 3)
        depth[y:y + bh, x:x + bw] = int(rng.integers(1500, 2400))
    color = np.clip(color.astype(np.int16) + rng.integers(-10, 10, color.shape), 0, 255).astype(np.uint8)
    depth[rng.random((h, w)) < 0.02] = 0
    return color, depth
