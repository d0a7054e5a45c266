"""The serving pipeline end to end: a real server, a real client, real shared memory."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pycocotools import mask as mask_util

from dd.client import DetectorClient, make_request
from dd.config import load_model_config
from dd.worker.engines.base import EngineInput
from dd.worker.engines.null import null_detections
from dd.worker.engines.torchvision_maskrcnn import TorchvisionMaskRCNN
from tests.conftest import scene
from tests.serverproc import ServerProcess


def png(arr: np.ndarray) -> bytes:
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


_engines: dict[str, TorchvisionMaskRCNN] = {}
_lock = threading.Lock()


def reference(model_repo: Path, name: str, color: np.ndarray, depth: np.ndarray | None, thr: float = 0.0):
    """The same model run in this process, as a script would."""
    with _lock:
        if name not in _engines:
            eng = TorchvisionMaskRCNN(load_model_config(model_repo / name, name=name), "cpu")
            eng.load()
            _engines[name] = eng
        eng = _engines[name]
        return eng.infer([EngineInput(color, depth, thr or eng.config.score_threshold)])[0]


def assert_same(result, det, box_tol: float = 1e-3, score_tol: float = 1e-5, exact_masks: bool = True) -> None:
    """Every served instance matches one in-process instance: class, score, box and mask.

    Random weights give many near-equal scores, whose order can flip with the
    thread count, so instances are matched by box rather than compared by position.
    """
    assert len(result.instances) == len(det.scores), (len(result.instances), len(det.scores))
    assert len(det.scores) > 0, "the test image should give instances"
    unmatched = set(range(len(det.scores)))
    for inst in result.instances:
        found = None
        for j in sorted(unmatched):
            if det.labels[j] == inst.class_id and np.allclose(inst.box, det.boxes[j], atol=box_tol):
                found = j
                break
        assert found is not None, f"served instance {inst} has no in-process twin"
        unmatched.discard(found)
        assert abs(inst.score - det.scores[found]) <= score_tol
        mask = det.masks[found]
        if exact_masks:
            assert np.array_equal(inst.mask, mask)
        else:
            inter = np.logical_and(inst.mask, mask).sum()
            union = np.logical_or(inst.mask, mask).sum()
            assert union == 0 or inter / union >= 0.98


def test_served_equals_in_process_rgbd(server: ServerProcess, model_repo: Path) -> None:
    color, depth = scene(1)
    with DetectorClient(server.target) as client:
        result = client.detect(png(color), png(depth), model="rgbd", request_id="one")
    assert result.request_id == "one" and result.model == "rgbd"
    assert (result.height, result.width) == color.shape[:2]
    assert_same(result, reference(model_repo, "rgbd", color, depth))
    # The RLE is COCO's: pycocotools decodes it to the same mask.
    inst = result.instances[0]
    decoded = mask_util.decode({"size": [result.height, result.width], "counts": inst.rle["counts"]})
    assert np.array_equal(decoded.astype(bool), inst.mask)


def test_served_equals_in_process_rgb_raw(server: ServerProcess, model_repo: Path) -> None:
    color, _ = scene(2)
    with DetectorClient(server.target) as client:
        result = client.detect(color, model="rgb", score_threshold=0.2)
    assert_same(result, reference(model_repo, "rgb", color, None, 0.2))
    assert {i.class_name for i in result.instances} <= {"carton", "bag"}


def test_rgbd_without_depth_is_invalid(server: ServerProcess) -> None:
    color, _ = scene(3)
    with DetectorClient(server.target) as client, pytest.raises(grpc.RpcError) as err:
        client.detect(png(color), model="rgbd")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "depth" in err.value.details()


def test_unknown_model_is_not_found(server: ServerProcess) -> None:
    color, depth = scene(3)
    with DetectorClient(server.target) as client, pytest.raises(grpc.RpcError) as err:
        client.detect(png(color), png(depth), model="nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "rgbd" in err.value.details()  # says what is served


def test_concurrent_requests_get_their_own_answers(server: ServerProcess, model_repo: Path) -> None:
    """8 threads, 64 requests, 16 different images, over 2 frontends and 2 RGB-D workers."""
    images = [scene(100 + k) for k in range(16)]
    refs = [reference(model_repo, "rgbd", c, d) for c, d in images]
    encoded = [(png(c), png(d)) for c, d in images]
    with DetectorClient(server.target) as client:
        def call(i: int):
            k = i % len(images)
            return k, client.detect(*encoded[k], model="rgbd", request_id=f"req-{i}"), i

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(call, range(64)))
    workers = set()
    batched = 0
    for k, result, i in results:
        assert result.request_id == f"req-{i}"
        # Batching pads images together, which may move a mask pixel on the 0.5 boundary: allow tiny drift.
        assert_same(result, refs[k], box_tol=1e-2, score_tol=1e-4, exact_masks=False)
        workers.add(result.worker)
        batched += result.timing["batch_size"] > 1
    assert workers == {"rgbd.0", "rgbd.1"}, workers


def test_null_engine_answers_are_a_function_of_the_input(server: ServerProcess) -> None:
    with DetectorClient(server.target) as client:
        for seed in range(3):
            color, depth = scene(seed)
            result = client.detect(color, depth, model="null")
            expected = null_detections(color, depth, 4, 2, 0.0)
            assert [i.score for i in result.instances] == pytest.approx(expected.scores.tolist(), abs=1e-6)
            assert np.array_equal(result.instances[0].mask, expected.masks[0])


def test_masks_none_sends_no_masks(server: ServerProcess) -> None:
    color, depth = scene(4)
    with DetectorClient(server.target) as client:
        result = client.detect(color, depth, model="rgbd", masks=False)
    assert result.instances and all(i.rle is None for i in result.instances)
    assert result.timing["total_us"] > 0 and result.timing["inference_us"] > 0


def test_detect_stream(server: ServerProcess) -> None:
    frames = [scene(200 + k) for k in range(6)]
    reqs = [make_request(c, d, model="rgbd", request_id=f"s{k}") for k, (c, d) in enumerate(frames)]
    reqs.append(make_request(frames[0][0], model="rgbd", request_id="bad"))  # no depth: fails alone
    with DetectorClient(server.target) as client:
        results = {r.request_id: r for r in client.detect_stream(reqs, timeout=60)}
    assert set(results) == {f"s{k}" for k in range(6)} | {"bad"}
    assert results["bad"].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert all(results[f"s{k}"].error_code == 0 and results[f"s{k}"].height == 240 for k in range(6))


def test_list_models(server: ServerProcess) -> None:
    with DetectorClient(server.target) as client:
        models = {m.name: m for m in client.list_models()}
    assert set(models) == {"rgbd", "rgb", "null"}
    assert models["rgbd"].input_kind == "rgbd" and models["rgb"].input_kind == "rgb"
    assert list(models["rgb"].categories) == ["carton", "bag"]
    assert models["rgbd"].ready and models["rgbd"].ready_workers == 2 and models["rgbd"].max_batch_size == 4
    assert models["rgbd"].engine == "torchvision" and models["null"].engine == "null"


def test_health_and_reflection(server: ServerProcess) -> None:
    assert server.health() == health_pb2.HealthCheckResponse.SERVING
    assert server.health("deep_detection.v1.Detector") == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(server.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"deep_detection.v1.Detector", "grpc.health.v1.Health"} <= names


def test_sigterm_leaves_nothing_behind(model_repo: Path) -> None:
    srv = ServerProcess(model_repo / "null", frontends=2).start()
    try:
        srv.wait_serving(60)
        # One ring per frontend; SERVING from one frontend does not mean the other is up yet.
        end = time.monotonic() + 30
        while len(srv.segments()) < 2 and time.monotonic() < end:
            time.sleep(0.05)
        assert len(srv.segments()) == 2
        color, depth = scene(5)
        with DetectorClient(srv.target) as client:
            assert client.detect(color, depth).instances
    finally:
        rc = srv.stop()
    assert rc == 0, srv.log()
    assert srv.segments() == []
    assert not srv.run_dir.exists()
