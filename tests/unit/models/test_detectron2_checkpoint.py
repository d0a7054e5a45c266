"""Weights files: recognised by their parameter names in every container users have, read without running code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dd.config import ConfigError
from dd.models.detectron2.checkpoint import WeightsError, read_weights, sniff_weights_format
from dd.models.detectron2.config import read_detectron2_yaml
from tests.d2_folders import SMALL_YAML, d2_state_dict, save_weights, write_d2_folder

DATA = Path(__file__).parents[2] / "data" / "detectron2"
MARKER = Path("/tmp/dd-test-pickle-ran")


class RunsCode:
    """Pickles as a call of os.system: what a malicious checkpoint looks like."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


class TrainerThing:
    """A class of the training run's own (a custom scheduler, say): not code we can import when serving."""

    def __init__(self) -> None:
        self.gamma = 0.1

    def __setstate__(self, state: dict) -> None:
        MARKER.touch()  # would mean the checkpoint ran this class's code while loading
        self.__dict__.update(state)


@pytest.fixture(autouse=True)
def no_marker():
    MARKER.unlink(missing_ok=True)
    yield
    assert not MARKER.exists(), "loading a weights file ran code from it"


@pytest.fixture(scope="module")
def d2_state(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    path = tmp_path_factory.mktemp("y") / "m.yaml"
    import yaml

    path.write_text(yaml.safe_dump(SMALL_YAML))
    return d2_state_dict(read_detectron2_yaml(path))


def test_a_real_detectron2_trainer_checkpoint_is_recognised_and_read() -> None:
    path = DATA / "trainer" / "model_final.pth"
    assert sniff_weights_format(path) == "detectron2"
    found = read_weights(path)
    assert found.format == "detectron2"
    assert found.container.startswith("detectron2 trainer checkpoint") and "trainer" in found.container
    assert "backbone.bottom_up.stem.conv1.weight" in found.state and not found.notes
    assert all(isinstance(v, torch.Tensor) for v in found.state.values())


@pytest.mark.parametrize("container, words", [
    ("trainer", "detectron2 trainer checkpoint"), ("bare", "bare state dict"), ("wrapped", "{'model': ...}"),
    ("legacy", "bare state dict"), ("zoo", "model-zoo checkpoint (Detectron2 Model Zoo), numpy pickle"),
])
def test_every_container_is_read_and_recognised(tmp_path: Path, d2_state: dict, container: str, words: str) -> None:
    path = tmp_path / ("w.pkl" if container == "zoo" else "w.pth")
    save_weights(path, d2_state, container)
    assert sniff_weights_format(path) == "detectron2"
    found = read_weights(path)
    assert found.format == "detectron2" and words in found.container
    assert found.state.keys() == d2_state.keys()
    for k, v in d2_state.items():
        assert torch.equal(found.state[k], v), k


def test_torchvision_names_and_module_prefixes(tmp_path: Path) -> None:
    demo = Path(__file__).resolve().parents[3] / "configs" / "models" / "demo-rgb" / "model.pth"
    assert sniff_weights_format(demo) == "torchvision"
    state = {"module.backbone.body.conv1.weight": torch.ones(2, 3, 1, 1),
             "module.rpn.head.cls_logits.bias": torch.ones(1)}
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    found = read_weights(tmp_path / "w.pth")
    assert found.format == "torchvision" and "state_dict" in found.container
    assert set(found.state) == {"backbone.body.conv1.weight", "rpn.head.cls_logits.bias"}
    assert sniff_weights_format(tmp_path / "w.pth") == "torchvision"


def test_unrecognised_names_are_neither(tmp_path: Path) -> None:
    torch.save({"conv1_w": torch.ones(1)}, tmp_path / "w.pth")
    assert sniff_weights_format(tmp_path / "w.pth") is None
    found = read_weights(tmp_path / "w.pth")
    assert found.format is None and "Caffe2" in found.notes[0]


def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"backbone.bottom_up.stem.conv1.weight": np.ones(3)}, "x": RunsCode()}, f)
    assert sniff_weights_format(path) == "detectron2"  # reading the names runs nothing either
    with pytest.raises(WeightsError, match="posix.system|os.system|not allowed"):
        read_weights(path)


def test_a_torch_file_that_would_run_code_is_refused(tmp_path: Path, d2_state: dict) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": d2_state, "trainer": RunsCode()}, path)
    with pytest.raises(WeightsError, match="system.*refused"):
        read_weights(path)
    assert isinstance(WeightsError("x"), ConfigError)


def test_foreign_trainer_state_is_skipped_without_running_it(tmp_path: Path, d2_state: dict) -> None:
    """A trainer checkpoint whose non-weight state holds a class weights_only refuses: the weights are
    still read; the class is never imported or run (its stand-in keeps nothing)."""
    path = tmp_path / "w.pth"
    torch.save({"model": d2_state, "trainer": {"scheduler": TrainerThing()}, "iteration": 9}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    found = read_weights(path)
    assert found.format == "detectron2" and found.state.keys() == d2_state.keys()
    assert "TrainerThing" in found.notes[0] and "placeholder" in found.notes[0]


def test_model_entries_must_be_tensors(tmp_path: Path) -> None:
    torch.save({"model": {"backbone.bottom_up.stem.conv1.weight": [1, 2]}}, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match="'backbone.bottom_up.stem.conv1.weight' is a list"):
        read_weights(tmp_path / "w.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError):
        read_weights(tmp_path / "junk.pth")


def test_the_folder_config_recognises_every_container(tmp_path: Path) -> None:
    from dd.config import load_model_config

    for container in ("trainer", "bare", "zoo", "legacy"):
        name = "model.pkl" if container == "zoo" else "model.pth"
        cfg = load_model_config(write_d2_folder(tmp_path / container, container=container, weights_name=name))
        assert cfg.weights_format == "detectron2" and cfg.engine == "detectron2", container
