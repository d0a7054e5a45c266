"""KServe v2 / Triton gRPC against a real server, with NVIDIA's tritonclient (in its own environment).

The server serves the trained demo RGB-D model (real detections) and a null RGB model, and KServe
also on a port of its own (--kserve-port). tests/tritonclient_serve_probe.py makes every call with
tritonclient's public API and prints what it got; the answers are compared with what our own
Detector client gets for the same image from the same server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pycocotools import mask as mask_util

from dd.client.api import DetectorClient, Result
from dd.proto.inference import grpc_service_pb2 as pb
from dd.proto.inference import grpc_service_pb2_grpc as pb_grpc
from tests import tritonclient_env
from tests.serverproc import REPO, ServerProcess, free_port

HERE = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "models" / "demo-rgbd"
COLOR = REPO / "test_imgs" / "rgbd" / "color" / "scene_900000.jpg"
DEPTH = REPO / "test_imgs" / "rgbd" / "depth" / "scene_900000.png"

pytestmark = pytest.mark.skipif(not (DEMO / "node_config.json").is_file(), reason="the demo RGB-D model is absent")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, int]]:
    tritonclient_env.tritonclient_python()  # before the server: making the environment may take a while
    repo = tmp_path_factory.mktemp("kserve-models")
    (repo / "demo-rgbd").symlink_to(DEMO)
    null = repo / "null-rgb"
    null.mkdir()
    (null / "categories.txt").write_text("a\nb\n")
    (null / "node_config.json").write_text(json.dumps({
        "DETECTION_TYPE": "RGBNullServicer", "CATEGORY_FILE": "categories.txt", "SCORE_THRESH_TEST": 0.0,
        "ENGINE_OPTIONS": {"instances": 3}}))
    kserve_port = free_port()
    with ServerProcess(repo, frontends=1, args=["--kserve-port", str(kserve_port)]) as srv:
        srv.wait_workers_ready({"demo-rgbd": 1, "null-rgb": 1})
        yield srv, kserve_port


@pytest.fixture(scope="module")
def probed(served, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    srv, kserve_port = served
    folder = tmp_path_factory.mktemp("probe")
    color = cv2.cvtColor(cv2.imread(str(COLOR)), cv2.COLOR_BGR2RGB)
    depth = cv2.imread(str(DEPTH), cv2.IMREAD_UNCHANGED)
    np.save(folder / "color.npy", color)
    np.save(folder / "depth.npy", depth)
    spec = {"url": f"127.0.0.1:{kserve_port}", "model": "demo-rgbd", "rgb_model": "null-rgb",
            "color_file": str(COLOR), "depth_file": str(DEPTH), "color_npy": str(folder / "color.npy"),
            "depth_npy": str(folder / "depth.npy")}
    (folder / "spec.json").write_text(json.dumps(spec))
    return json.loads(tritonclient_env.run(HERE / "tritonclient_serve_probe.py", str(folder / "spec.json"),
                                           timeout=600).stdout)


@pytest.fixture(scope="module")
def detector(served) -> Result:
    """What the Detector API answers for the same files, from the same server."""
    with DetectorClient(served[0].target, timeout=120) as client:
        return client.detect(COLOR, DEPTH, model="demo-rgbd")


def _masks(result: dict[str, Any]) -> list[np.ndarray]:
    h, w = result["parameters"]["height"], result["parameters"]["width"]
    return [mask_util.decode({"size": [h, w], "counts": bytes.fromhex(c)}).astype(bool)
            for c in result["tensors"]["masks"]["values"]]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(1, float((a | b).sum()))


def assert_same_detections(result: dict[str, Any], reference: Result) -> None:
    """The same instances as the Detector's answer: boxes within a hundredth of a pixel, scores within 1e-4
    (a raw tensor and the decoded file are the same pixels, but float work may differ in the last bits),
    the same classes, masks of IoU >= 0.99."""
    t = result["tensors"]
    n = len(reference.instances)
    assert n > 0 and t["boxes"]["shape"] == [n, 4] and t["scores"]["shape"] == [n]
    np.testing.assert_allclose(np.reshape(t["boxes"]["values"], (n, 4)), [i.box for i in reference.instances],
                               atol=0.01)
    np.testing.assert_allclose(t["scores"]["values"], [i.score for i in reference.instances], atol=1e-4)
    assert t["classes"]["values"] == [i.class_id for i in reference.instances]
    assert (result["parameters"]["height"], result["parameters"]["width"]) == (reference.height, reference.width)
    for mask, inst in zip(_masks(result), reference.instances):
        assert _iou(mask, inst.mask) >= 0.99


def test_live_ready_and_the_index(probed) -> None:
    assert (probed["live"], probed["ready"], probed["model_ready"], probed["unknown_model_ready"]) == (
        True, True, True, False)
    assert probed["index"]["models"] == [{"name": "demo-rgbd", "version": "1", "state": "READY"},
                                         {"name": "null-rgb", "version": "1", "state": "READY"}]


def test_server_and_model_metadata(probed) -> None:
    assert probed["server_metadata"]["name"] == "deep-detection"
    assert probed["server_metadata"]["extensions"] == ["model_configuration", "statistics"]
    meta = probed["model_metadata"]
    assert meta["name"] == "demo-rgbd" and meta["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("color", "UINT8", ["-1", "-1", "3"]), ("depth", "UINT16", ["-1", "-1"])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [
        ("boxes", "FP32", ["-1", "4"]), ("scores", "FP32", ["-1"]), ("classes", "INT32", ["-1"]),
        ("masks", "BYTES", ["-1"])]
    assert [t["name"] for t in probed["rgb_metadata"]["inputs"]] == ["color"]
    assert probed["unknown_metadata"]["error"]["status"] == "StatusCode.NOT_FOUND"


def test_model_config(probed) -> None:
    config = probed["model_config"]["config"]
    assert config["name"] == "demo-rgbd" and config["backend"] == "deep-detection"
    assert [(i["name"], i["data_type"]) for i in config["input"]] == [("color", "TYPE_UINT8"), ("depth", "TYPE_UINT16")]
    assert [(o["name"], o["data_type"]) for o in config["output"]] == [
        ("boxes", "TYPE_FP32"), ("scores", "TYPE_FP32"), ("classes", "TYPE_INT32"), ("masks", "TYPE_STRING")]
    assert config["parameters"]["SCORE_THRESH_TEST"] == {"string_value": "0.5"}
    assert config["parameters"]["CATEGORIES"]["string_value"]
    assert int(config["max_batch_size"]) >= 1


def test_encoded_inputs_give_the_detector_apis_answer(probed, detector: Result) -> None:
    result = probed["infer_encoded"]
    assert (result["id"], result["model_name"], result["model_version"]) == ("enc-1", "demo-rgbd", "1")
    assert result["outputs"] == ["boxes", "scores", "classes", "masks"]
    assert_same_detections(result, detector)


def test_raw_inputs_give_the_detector_apis_answer(probed, detector: Result) -> None:
    assert probed["infer_raw"]["id"] == "raw-1"
    assert_same_detections(probed["infer_raw"], detector)
    assert_same_detections(probed["infer_metres"], detector)  # FP32 metres: the same depth


def test_only_the_requested_outputs(probed, detector: Result) -> None:
    result = probed["infer_subset"]
    assert result["outputs"] == ["scores", "classes"] and list(result["tensors"]) == ["scores", "classes"]
    assert result["tensors"]["classes"]["values"] == probed["infer_raw"]["tensors"]["classes"]["values"]


def test_the_score_threshold_parameter(probed) -> None:
    every = probed["infer_raw"]["tensors"]["scores"]["values"]
    high = probed["infer_threshold"]["tensors"]["scores"]["values"]
    assert all(s >= 0.9 for s in high) and len(high) == sum(s >= 0.9 for s in every)


def test_statistics_count_what_this_frontend_served(probed) -> None:
    stats = probed["statistics"]["model_stats"][0]
    assert stats["name"] == "demo-rgbd"
    inference = stats["inference_stats"]
    assert inference["success"]["count"] == "5"  # the five inferences before it
    assert stats["inference_count"] == "5"
    # From the worker's reply envelope: each request's engine call, input decoding and encoding.
    for key in ("success", "compute_input", "compute_infer", "compute_output"):
        assert inference[key]["count"] == "5" and int(inference[key]["ns"]) > 0, (key, inference)
    assert int(inference["compute_infer"]["ns"]) < int(inference["success"]["ns"])


@pytest.mark.parametrize("case, status, words", [
    ("bad_datatype", "INVALID_ARGUMENT", "input 'color': datatype 'FP32' is not accepted; send UINT8 [H, W, 3]"),
    ("missing_depth", "INVALID_ARGUMENT", "is RGB-D and needs input 'depth'"),
    ("unknown_model", "NOT_FOUND", "model 'nope' is not served here"),
    ("unknown_output", "INVALID_ARGUMENT", "unknown output 'x'; the outputs are boxes, scores, classes, masks"),
    ("not_an_image", "INVALID_ARGUMENT", "not a JPEG, PNG, BMP, TIFF or WebP image"),
    ("depth_on_rgb", "INVALID_ARGUMENT", "an RGB model takes no depth"),
    ("shm_register", "UNIMPLEMENTED", "--allow-client-shm"),
])
def test_bad_requests_get_statuses(probed, case: str, status: str, words: str) -> None:
    error = probed[case]["error"]
    assert error["status"] == f"StatusCode.{status}" and words in error["message"]


def test_an_rgb_model(probed) -> None:
    result = probed["rgb"]["ok"]
    assert result["id"] == "rgb-1" and result["tensors"]["boxes"]["shape"] == [3, 4]


def test_streaming_answers_each_request_and_goes_on_after_an_error(probed, detector: Result) -> None:
    stream = {item.get("id", "error"): item for item in probed["stream"]}
    assert set(stream) == {"s-1", "s-3", "error"}
    assert stream["error"]["error"]["message"].startswith("model 'nope' is not served here")
    assert_same_detections(stream["s-1"], detector)
    assert stream["s-3"]["outputs"] == ["boxes", "scores"]


def test_the_detector_port_serves_kserve_too_and_health_and_reflection_list_it(served) -> None:
    srv, kserve_port = served
    for target in (srv.target, f"127.0.0.1:{kserve_port}"):
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
            assert stub.ModelReady(pb.ModelReadyRequest(name="null-rgb"), timeout=10).ready
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

            reply = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
            services = {s.name for s in reply.list_services_response.service}
            assert "inference.GRPCInferenceService" in services
            assert ("deep_detection.v1.Detector" in services) == (target == srv.target)


def test_a_corrupt_message_is_invalid_argument(served) -> None:
    with grpc.insecure_channel(served[0].target) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as err:
            call(b"\xff\xff\xff", timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid inference.ModelInferRequest" in err.value.details()


def test_the_docs_example_runs_as_written(served) -> None:
    """docs/kserve.md's first tritonclient example, pointed at this server, from the repository's root."""
    doc = (REPO / "docs" / "kserve.md").read_text()
    start = doc.index("```python\nimport numpy as np\nimport tritonclient.grpc")
    code = doc[start + len("```python\n"):doc.index("```", start + 10)]
    assert '"localhost:50051"' in code
    script = Path(served[0].run_dir) / "docs_example.py"
    script.write_text(f"import os\nos.chdir({str(REPO)!r})\n" + code.replace("localhost:50051", served[0].target))
    out = tritonclient_env.run(script, timeout=300).stdout
    assert "instances; first: class 1, score" in out, out
