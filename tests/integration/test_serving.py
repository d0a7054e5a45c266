"""The serving pipeline end to end: a real server, a real client, real shared memory."""

from __future__ import annotations

import json
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pycocotools import mask as mask_util

from dd.client import DetectionError, DetectorClient, make_request
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
    with DetectorClient(server.target) as client, pytest.raises(DetectionError) as err:
        client.detect(png(color), model="rgbd")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "depth" in err.value.details()
    assert err.value.model == "rgbd" and err.value.target == server.target


def test_unknown_model_is_not_found(server: ServerProcess) -> None:
    color, depth = scene(3)
    with DetectorClient(server.target) as client, pytest.raises(DetectionError) as err:
        client.detect(png(color), png(depth), model="nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.model == "nope"
    assert "'nope'" in str(err.value) and "rgbd" in err.value.details()  # says what is served
    # Code written against the raw stub still catches it; it crosses process boundaries whole.
    assert isinstance(err.value, grpc.RpcError) and isinstance(err.value, RuntimeError)
    back = pickle.loads(pickle.dumps(err.value))
    assert (back.code(), back.details(), back.model, back.target, str(back)) == \
        (err.value.code(), err.value.details(), "nope", server.target, str(err.value))


def test_unreachable_server_is_unavailable_from_every_call() -> None:
    """No server at the address: the library's own error, not grpc._channel._InactiveRpcError."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{s.getsockname()[1]}"
    color, depth = scene(3)
    with DetectorClient(target, timeout=5) as client:
        calls = {
            "detect": lambda: client.detect(color, depth, model="rgbd"),
            "list_models": client.list_models,
            "detect_stream": lambda: list(client.detect_stream([make_request(color, depth)], timeout=5)),
            "wait_ready": lambda: client.wait_ready(timeout=0.5),
        }
        for name, call in calls.items():
            with pytest.raises(DetectionError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (name, err.value)
            assert err.value.target == target and str(err.value).startswith(f"cannot reach a deep-detection server "
                                                                            f"{target}"), (name, str(err.value))
        assert err.value.__cause__ is None and err.value.__suppress_context__


def test_async_client_raises_detection_error(server: ServerProcess) -> None:
    import asyncio

    from dd.client import AsyncDetectorClient

    async def go() -> DetectionError:
        async with AsyncDetectorClient(server.target) as client:
            try:
                await client.detect(*scene(3), model="nope")
            except DetectionError as exc:
                return exc
        raise AssertionError("no error")

    err = asyncio.run(go())
    assert err.code() == grpc.StatusCode.NOT_FOUND and err.model == "nope"


DEMO = Path(__file__).resolve().parents[2] / "configs" / "models" / "demo-rgbd"


@pytest.fixture(scope="module")
def demo_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    """The trained RGB-D demo model behind 2 frontends and 2 workers (batches of up to 4).

    Why the trained model and not random weights: random weights score every box the same
    (0.4982...), so which 50 of hundreds of tied boxes survive the detection cap depends on how
    requests happened to batch, and no comparison can tell a mixed-up answer from a tied swap. The
    trained model's instances have distinct scores well clear of its threshold. Its MIN_SIZE here is
    the test images' own height (no resize): a third of the work on a CPU, same weights.
    """
    folder = tmp_path_factory.mktemp("demo") / "demo-rgbd"
    folder.mkdir()
    for name in ("model.pth", "categories.txt"):
        (folder / name).symlink_to(DEMO / name)
    cfg = json.loads((DEMO / "node_config.json").read_text())
    cfg.update(MIN_SIZE=240, MAX_SIZE=320, MAX_BATCH_SIZE=4, INSTANCES_PER_DEVICE=2)
    (folder / "node_config.json").write_text(json.dumps(cfg))
    with ServerProcess(folder, frontends=2) as srv:
        srv.wait_workers_ready({"demo-rgbd": 2})
        yield srv, folder


def assert_same_detections(result, det, threshold: float, cap: int, tol: float = 1e-3) -> None:
    """The served instances are the in-process ones: class, score, box, mask, one to one.

    Batching changes float rounding (a few 1e-5 here), so an instance whose score is within `tol`
    of the threshold, or of the lowest kept score when the cap was reached, may be kept on one side
    only. Every other instance must have its twin.
    """
    served = list(result.instances)
    ref = list(range(len(det.scores)))
    edge = [threshold]
    if len(served) >= cap or len(ref) >= cap:
        edge.append(min([i.score for i in served] + det.scores.tolist()))

    def at_edge(score: float) -> bool:
        return any(abs(score - e) <= tol for e in edge)

    for inst in served:
        twins = [j for j in ref if det.labels[j] == inst.class_id and abs(det.scores[j] - inst.score) <= tol
                 and np.allclose(inst.box, det.boxes[j], atol=0.05)]
        if not twins:
            assert at_edge(inst.score), f"served instance {inst} has no in-process twin"
            continue
        j = twins[0]
        ref.remove(j)
        inter = np.logical_and(inst.mask, det.masks[j]).sum()
        union = np.logical_or(inst.mask, det.masks[j]).sum()
        assert union > 0 and inter / union >= 0.98, f"mask of {inst}: IoU {inter / max(union, 1):.3f}"
    missing = [det.scores[j] for j in ref if not at_edge(float(det.scores[j]))]
    assert not missing, f"{len(missing)} in-process instance(s) not served, scores {missing}"


def test_concurrent_requests_get_their_own_answers(demo_pair: tuple[ServerProcess, Path]) -> None:
    """8 threads, 24 requests, 6 different scenes, over 2 workers: each answer is its own image's."""
    from dd.synth.scenes import generate_scene

    srv, folder = demo_pair
    scenes = [generate_scene(20_000_000 + k, 320, 240) for k in range(6)]
    cfg = load_model_config(folder, name="demo-rgbd")
    engine = TorchvisionMaskRCNN(cfg, "cpu")
    engine.load()
    refs = [engine.infer([EngineInput(s.color, s.depth, cfg.score_threshold)])[0] for s in scenes]
    engine.close()
    assert all(len(r.scores) > 0 for r in refs), "every test scene should give instances"
    assert len({len(r.scores) for r in refs}) > 2, "the scenes should differ in what they hold"
    encoded = [(png(s.color), png(s.depth)) for s in scenes]
    # A generous deadline: what is tested is whose answer each gets, not how soon (the CPU engine on a
    # machine busy with other work took over the default 30 s for the last of the 24).
    with DetectorClient(srv.target, timeout=600) as client:
        def call(i: int):
            k = i % len(scenes)
            return k, client.detect(*encoded[k], request_id=f"req-{i}"), i

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(call, range(24)))
    for k, result, i in results:
        assert result.request_id == f"req-{i}" and result.model == "demo-rgbd"
        assert_same_detections(result, refs[k], cfg.score_threshold, cfg.architecture["max_detections"])
    # Both workers took part (least-loaded dispatch with ties rotated; both were ready before).
    assert {r.worker for _, r, _ in results} == {"demo-rgbd.0", "demo-rgbd.1"}


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


def test_serve_without_path_serves_node_config_file(tmp_path: Path) -> None:
    """The seed's habit, `docker run ... -e NODE_CONFIG_FILE=model_repository/x/node_config.json IMAGE`:
    the image runs `deep-detection serve` with no PATH in its working directory, which must serve
    that model (path relative to the working directory), not the built-in demo models."""
    from tests.faults import null_model

    null_model(tmp_path / "model_repository" / "x")
    env = {"NODE_CONFIG_FILE": "model_repository/x/node_config.json"}
    with ServerProcess(None, env=env, cwd=tmp_path) as srv:  # no PATH, as the Dockerfile's CMD ["serve"]
        assert srv.argv[3] == "serve" and srv.argv[4] == "--host"
        with DetectorClient(srv.target) as client:
            assert [m.name for m in client.list_models()] == ["x"]
            color, depth = scene(6)
            assert len(client.detect(color, depth).instances) == 4
        log = srv.log()
    assert "no PATH given: serving model_repository/x/node_config.json ($NODE_CONFIG_FILE)" in log, log


_CONNECTIONS_CHILD = """
import asyncio, sys, threading
from dd.client import AsyncDetectorClient, DetectorClient, make_request
from tests.conftest import scene
target, kind, n, streams = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
color, depth = scene(1)
request = make_request(color, depth, model="null")
if kind == "sync":
    client = DetectorClient(target, connections=n)
    for _ in range(3):  # one call at a time: one connection
        client.detect_request(request)
    answered, hold = threading.Barrier(streams + 1), threading.Event()

    def requests():
        yield request
        hold.wait()  # the stream stays open, a call in flight, until the parent has counted

    def stream():
        for _ in client.detect_stream(requests()):
            answered.wait()

    for _ in range(streams):
        threading.Thread(target=stream, daemon=True).start()
    answered.wait()
else:
    async def main():
        client = AsyncDetectorClient(target, connections=n)
        for _ in range(3):
            await client.detect_request(request)
        hold = asyncio.Event()

        async def requests():
            yield request
            await hold.wait()

        streams_ = [client.detect_stream(requests()) for _ in range(streams)]
        for s in streams_:
            await s.__anext__()  # its answer came: the stream is open
        print("done", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
    asyncio.run(main())
print("done", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("kind,n,streams,expected", [("sync", 1, 3, 1), ("sync", 4, 3, 3), ("async", 4, 0, 1),
                                                     ("async", 4, 6, 4)])
def test_a_client_spreads_concurrent_calls_over_connections_of_its_own(server: ServerProcess, kind: str, n: int,
                                                                        streams: int, expected: int) -> None:
    """The server's frontends share its port and the kernel gives each TCP connection to one of them: a
    client whose calls all go over one connection is decoded by one frontend. Calls one at a time keep to
    one connection; calls in flight together (streams held open) take one each, up to `connections`, each
    a TCP connection of its own (counted in the client's process)."""
    import subprocess
    import sys

    import psutil

    port = int(server.target.rsplit(":", 1)[1])
    child = subprocess.Popen([sys.executable, "-c", _CONNECTIONS_CHILD, server.target, kind, str(n), str(streams)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[2])
    try:
        assert child.stdout.readline().strip() == "done"
        tcp = [c for c in psutil.Process(child.pid).net_connections("tcp")
               if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED]
        assert len(tcp) == expected, tcp
    finally:
        child.kill()
        child.wait()
