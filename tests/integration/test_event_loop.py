"""The frontends' event loop (--event-loop): uvloop where installed, asyncio's on request; both serve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dd.client import DetectorClient
from dd.config import ConfigError, ServerConfig
from dd.frontend.server import event_loop_factory
from tests.conftest import scene
from tests.serverproc import ServerProcess

uvloop = pytest.importorskip("uvloop")


def null_model(root: Path) -> Path:
    folder = root / "null-rgbd"
    folder.mkdir()
    (folder / "categories.txt").write_text("a\nb\n")
    (folder / "node_config.json").write_text(json.dumps({
        "DETECTION_TYPE": "RGBDNullServicer", "CATEGORY_FILE": "categories.txt", "SCORE_THRESH_TEST": 0.0}))
    return folder


@pytest.mark.parametrize("choice, says", [("auto", "frontend event loop: uvloop"),
                                          ("asyncio", "frontend event loop: asyncio's")])
def test_each_event_loop_serves(tmp_path: Path, choice: str, says: str) -> None:
    color, depth = scene(11)
    with ServerProcess(null_model(tmp_path), args=["--event-loop", choice]) as srv:
        srv.wait_workers_ready({"null-rgbd": 1})
        with DetectorClient(srv.target) as client:
            result = client.detect(color, depth)
        log = srv.log()
    assert result.instances and result.height == color.shape[0]
    assert says in log, log[-3000:]


def test_the_choice_is_checked_before_anything_starts() -> None:
    with pytest.raises(ConfigError, match="event_loop must be one of auto, uvloop, asyncio"):
        ServerConfig(event_loop="trio").validate()
    assert event_loop_factory("asyncio") is None
    assert event_loop_factory("auto") is uvloop.new_event_loop
