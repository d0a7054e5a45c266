"""The engine registry: names, DETECTION_TYPE aliases, typed ENGINE_OPTIONS, a user's "module:Class"."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dd.config import DETECTION_TYPES, ConfigError, load_model_config
from dd.config.engines import REGISTRY, available_engines

TESTS = Path(__file__).resolve().parents[1]


def _folder(root: Path, **keys: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "categories.txt").write_text("a\nb\n")
    (root / "node_config.json").write_text(json.dumps({"DETECTION_TYPE": "RGBNullServicer",
                                                       "CATEGORY_FILE": "categories.txt", **keys}))
    return root


def test_every_detection_type_names_a_registered_engine() -> None:
    assert DETECTION_TYPES["RGBDMaskRCNNTorchServicer"] == ("torchvision", "rgbd")
    assert DETECTION_TYPES["RGBMaskRCNNFastServicer"] == ("fast", "rgb")
    assert all(engine in REGISTRY for engine, _ in DETECTION_TYPES.values())
    assert {"torchvision", "detectron2", "fast", "null"} <= set(available_engines())
    for spec in REGISTRY.values():
        assert spec.fallback is None or REGISTRY[spec.fallback].available


def test_registry_is_read_without_torch() -> None:
    """The supervisor and frontends check ENGINE_OPTIONS before any process starts, without an engine."""
    code = "import sys, dd.config, dd.config.engines; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=TESTS.parent)


def test_misspelled_option_is_named_with_the_allowed_ones(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "m", ENGINE_OPTIONS={"instanses": 3})
    with pytest.raises(ConfigError, match=r"'instanses' is not an option of engine 'null'; allowed: cost_ms, "
                                          r"cost_ms_per_image, fail_on_pixel, instances, png_rows"):
        load_model_config(folder)


def test_option_of_the_wrong_type_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'instances' of engine 'null' must be int, got '4'"):
        load_model_config(_folder(tmp_path / "a", ENGINE_OPTIONS={"instances": "4"}))
    with pytest.raises(ConfigError, match=r"'fp16' of engine 'fast' must be bool, got 1"):
        folder = _folder(tmp_path / "b", ENGINE="fast", MODEL_WEIGHT="w.pth", WEIGHTS_FORMAT="torchvision",
                         ENGINE_OPTIONS={"fp16": 1})
        (folder / "w.pth").write_bytes(b"")
        load_model_config(folder)


def test_good_options_pass_and_ints_are_floats(tmp_path: Path) -> None:
    cfg = load_model_config(_folder(tmp_path / "m", ENGINE_OPTIONS={"instances": 2, "cost_ms": 3,
                                                                    "fail_on_pixel": None}))
    assert cfg.engine_options == {"instances": 2, "cost_ms": 3, "fail_on_pixel": None}


def test_unavailable_and_unknown_engines_say_what_is_available(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not available in this release; available: torchvision"):
        load_model_config(_folder(tmp_path / "a", ENGINE="torchscript", MODEL_WEIGHT="w"))
    with pytest.raises(ConfigError, match="unknown engine 'fsat'; one of: torchvision"):
        load_model_config(_folder(tmp_path / "b", ENGINE="fsat"))


@pytest.mark.parametrize("value, message", [
    ("no_such_module_xyz:Engine", "cannot find module 'no_such_module_xyz'"),
    ("custom_engine:", "is not of the form 'package.module:ClassName'"),
    ("bad-name:Engine", "is not of the form"),
])
def test_custom_engine_value_is_checked_at_config_time(tmp_path: Path, value: str, message: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS))
    with pytest.raises(ConfigError, match=message):
        load_model_config(_folder(tmp_path / "m", ENGINE=value))


def test_custom_engine_options_are_the_class_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dd.worker.engines import create_engine, load_engine

    monkeypatch.syspath_prepend(str(TESTS))
    cfg = load_model_config(_folder(tmp_path / "m", ENGINE="custom_engine:Boxes", ENGINE_OPTIONS={"score": 0.7}))
    assert load_engine(cfg, "cpu").score == 0.7
    bad = load_model_config(_folder(tmp_path / "b", ENGINE="custom_engine:Boxes", ENGINE_OPTIONS={"scor": 1}))
    with pytest.raises(ConfigError, match="'scor' is not an option of engine 'custom_engine:Boxes'; allowed: score"):
        create_engine(bad, "cpu")
    not_engine = load_model_config(_folder(tmp_path / "c", ENGINE="custom_engine:np"))
    with pytest.raises(ConfigError, match="is not a class implementing"):
        create_engine(not_engine, "cpu")
