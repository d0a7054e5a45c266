"""Client system shared memory (--allow-client-shm) against a real server with two frontends, with NVIDIA's
tritonclient (tests/tritonclient_shm_probe.py, in tritonclient's own environment): inputs read from a
registered region give the same answer as the same tensors in the message; outputs written into a
region are the same tensors; ranges, keys, owners and names are refused with statuses; registrations
go at unregister and when the server stops."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from dd.ipc.client_segments import SUBDIR
from tests import tritonclient_env
from tests.serverproc import REPO, ServerProcess
from tests.integration.test_kserve_serving import COLOR, DEMO, DEPTH

HERE = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not (DEMO / "node_config.json").is_file(), reason="the demo RGB-D model is absent")


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tritonclient_env.tritonclient_python()  # before the server: making the environment may take a while
    repo = tmp_path_factory.mktemp("shm-models")
    (repo / "demo-rgbd").symlink_to(DEMO)
    folder = tmp_path_factory.mktemp("shm-probe")
    np.save(folder / "color.npy", cv2.cvtColor(cv2.imread(str(COLOR)), cv2.COLOR_BGR2RGB))
    np.save(folder / "depth.npy", cv2.imread(str(DEPTH), cv2.IMREAD_UNCHANGED))
    with ServerProcess(repo, frontends=2, args=["--allow-client-shm", "--slot-mb", "8"]) as srv:
        srv.wait_workers_ready({"demo-rgbd": 1})
        spec = {"url": srv.target, "model": "demo-rgbd", "color_file": str(COLOR), "depth_file": str(DEPTH),
                "color_npy": str(folder / "color.npy"),
                "depth_npy": str(folder / "depth.npy")}
        (folder / "spec.json").write_text(json.dumps(spec))
        out = json.loads(tritonclient_env.run(HERE / "tritonclient_shm_probe.py", str(folder / "spec.json"),
                                              timeout=600).stdout)
        out["registrations_while_serving"] = (srv.run_dir / SUBDIR).is_dir()
        out["docs_example"] = _run_docs_example(srv)
        run_dir = srv.run_dir
    out["registrations_after_stop"] = (run_dir / SUBDIR).exists()
    return out


def _run_docs_example(srv: ServerProcess) -> str:
    """docs/kserve.md's client shared-memory example, pointed at this server, as written."""
    doc = (REPO / "docs" / "kserve.md").read_text()
    start = doc.index("```python", doc.index("### Client shared memory"))
    code = doc[start + len("```python\n"):doc.index("```", start + 10)]
    script = Path(srv.run_dir) / "docs_shm_example.py"
    script.write_text(code.replace("localhost:50051", srv.target))
    return tritonclient_env.run(script, timeout=300).stdout


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Equal tensors: the same pixels reach the engine either way."""
    assert a["tensors"]["boxes"]["shape"][0] > 0
    for name in ("boxes", "scores", "classes", "masks"):
        assert a["tensors"][name]["shape"] == b["tensors"][name]["shape"], name
        assert a["tensors"][name]["values"] == b["tensors"][name]["values"], name
    assert a["parameters"]["height"] == b["parameters"]["height"] and a["parameters"]["width"] == b["parameters"]["width"]


def test_the_extension_is_declared_and_regions_are_listed(probed) -> None:
    assert "system_shared_memory" in probed["extensions"]
    regions = probed["status"]["regions"]
    assert set(regions) == {"in", "out"}  # before "enc" is registered
    assert regions["out"]["byte_size"] == str(4 << 20) and regions["in"]["key"].startswith("/dd_probe_in_")


def test_inputs_in_shared_memory_give_the_answer_of_inputs_in_the_message(probed) -> None:
    for result in probed["shm_inputs"]:
        _same(result, probed["message"])
    _same(probed["mixed"], probed["message"])  # color in shared memory, depth in the message


def test_encoded_images_in_shared_memory_give_the_same_instances(probed) -> None:
    got, want = probed["shm_encoded"]["tensors"], probed["message"]["tensors"]
    assert got["classes"]["values"] == want["classes"]["values"]
    np.testing.assert_allclose(got["boxes"]["values"], want["boxes"]["values"], atol=0.01)
    np.testing.assert_allclose(got["scores"]["values"], want["scores"]["values"], atol=1e-4)


def test_outputs_written_into_shared_memory(probed) -> None:
    result = probed["shm_outputs"]
    assert result["outputs"] == ["boxes", "scores", "classes", "masks"]
    assert result["raw_lengths"] == [0, 0, 0, 0]  # the bytes are in the region, not in the response
    _same(result, probed["message"])
    n = result["tensors"]["boxes"]["shape"][0]
    assert result["written"]["boxes"] == n * 16 and result["written"]["scores"] == n * 4


@pytest.mark.parametrize("case, status, words", [
    ("output_too_small", "INVALID_ARGUMENT", "output 'boxes' is"),
    ("input_past_region", "INVALID_ARGUMENT", "reaches outside it"),
    ("unknown_region", "INVALID_ARGUMENT", "no shared-memory region named 'nope' is registered"),
    ("register_twice", "ALREADY_EXISTS", "already registered"),
    ("register_missing_key", "INVALID_ARGUMENT", "does not exist"),
    ("register_too_large", "INVALID_ARGUMENT", "use a range inside the segment"),
    ("register_other_user", "PERMISSION_DENIED", "belongs to uid 12345"),
    ("infer_after_unregister", "INVALID_ARGUMENT", "no shared-memory region named 'in' is registered"),
])
def test_refusals(probed, case: str, status: str, words: str) -> None:
    if case not in probed:
        pytest.skip("needs root to make a segment of another user")
    error = probed[case]["error"]
    assert error["status"] == f"StatusCode.{status}" and words in error["message"], error


def test_unregister_one_then_all_and_nothing_left_after_stop(probed) -> None:
    assert set(probed["status_after_unregister"].get("regions", {})) == {"out", "enc"}
    assert probed["status_after_unregister_all"].get("regions", {}) == {}
    assert probed["registrations_while_serving"] and not probed["registrations_after_stop"]


def test_the_docs_example_runs_as_written(probed) -> None:
    assert probed["docs_example"].startswith("[]") or "[[" in probed["docs_example"], probed["docs_example"]
