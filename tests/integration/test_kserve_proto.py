"""protos/inference speaks the wire of NVIDIA's tritonclient.

Two kinds of evidence, both from tritonclient itself (in its own virtual
environment, tests/tritonclient_env.py, since it pins protobuf < 7):
- its generated descriptors, dumped as JSON by a subprocess, compared message by
  message and field by field with ours (name, number, wire type, label, the
  message or enum a field refers to, oneof), its enums value by value, its
  service method by method;
- its client, over loopback, against a GRPCInferenceService built in this
  process from our generated code: every call deep-detection will answer, raw
  and encoded (BYTES) inputs, request and response parameters, statuses,
  streaming, and a call we do not declare (UNIMPLEMENTED).

The service here is a fixture of the wire, not deep-detection's server: the
server's adapter (dd/frontend/protocols/kserve_v2.py) is tested against a real
server with tritonclient in tests/integration/test_kserve_serving.py.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import struct
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from dd.proto.inference import grpc_service_pb2 as pb
from dd.proto.inference import grpc_service_pb2_grpc as pb_grpc
from dd.proto.inference import model_config_pb2 as mc
from tests import tritonclient_env
from tests.descriptor_dump import dump

HERE = Path(__file__).resolve().parents[1]
OURS = ("dd.proto.inference.grpc_service_pb2", "dd.proto.inference.model_config_pb2")
THEIRS = ("tritonclient.grpc.service_pb2", "tritonclient.grpc.model_config_pb2")

# The calls issue 16 names; the service must declare exactly these.
RPCS = {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "ModelStreamInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex", "SystemSharedMemoryStatus",
        "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister"}


@pytest.fixture(scope="module")
def theirs() -> dict[str, Any]:
    done = tritonclient_env.run(HERE / "descriptor_dump.py", *THEIRS)
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def ours() -> dict[str, Any]:
    return dump(list(OURS))


def mismatches(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """Everything we declare that tritonclient declares differently or not at all."""
    problems = []
    for message, fields in ours["messages"].items():
        if message not in theirs["messages"]:
            problems.append(f"{message}: tritonclient has no such message")
            continue
        for name, field in fields.items():
            other = theirs["messages"][message].get(name)
            if other is None:
                problems.append(f"{message}.{name}: tritonclient has no such field")
            elif other != field:
                problems.append(f"{message}.{name}: ours {field}, tritonclient's {other}")
    for enum, values in ours["enums"].items():
        other = theirs["enums"].get(enum)
        if other is None:
            problems.append(f"{enum}: tritonclient has no such enum")
            continue
        problems += [f"{enum}.{name} = {number}: tritonclient's is {other.get(name)}"
                     for name, number in values.items() if other.get(name) != number]
    for service, methods in ours["services"].items():
        other = theirs["services"].get(service, {})
        problems += [f"{service}.{name}: ours {method}, tritonclient's {other.get(name)}"
                     for name, method in methods.items() if other.get(name) != method]
    return problems


def test_an_unreachable_package_index_skips_and_leaves_no_half_made_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    venv = tmp_path / "venv"
    monkeypatch.setenv("DD_TRITONCLIENT_VENV", str(venv))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no configured mirrors or wheel folders
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{closed.getsockname()[1]}/simple")
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)
    try:
        with pytest.raises(pytest.skip.Exception, match="package index is unreachable"):
            tritonclient_env.tritonclient_python()
    finally:
        closed.close()
    assert not venv.exists()


def test_every_declaration_matches_tritonclient(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    assert mismatches(ours, theirs) == []


def test_the_comparison_sees_a_wrong_number_a_wrong_type_and_a_wrong_rpc(
        ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    broken = copy.deepcopy(ours)
    broken["messages"]["inference.ModelInferRequest"]["raw_input_contents"]["number"] = 8
    broken["messages"]["inference.InferParameter"]["int64_param"]["type"] = 13  # uint32
    broken["enums"]["inference.DataType"]["TYPE_FP32"] = 12
    broken["services"]["inference.GRPCInferenceService"]["ModelInfer"]["server_streaming"] = True
    found = mismatches(broken, theirs)
    assert len(found) == 4, found
    assert any("raw_input_contents" in p for p in found) and any("int64_param" in p for p in found)


def test_the_service_declares_the_calls_of_issue_16(ours: dict[str, Any]) -> None:
    assert set(ours["services"]) == {"inference.GRPCInferenceService"}
    assert set(ours["services"]["inference.GRPCInferenceService"]) == RPCS


def test_service_messages_have_every_field_tritonclient_has(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    """A request or response must not drop what the client sends or reads; only the
    model configuration (model_config.proto) may be a subset of Triton's."""
    service_messages = [m for m in ours["messages"]
                        if pb.DESCRIPTOR.pool.FindMessageTypeByName(m).file.name == pb.DESCRIPTOR.name]
    assert "inference.ModelInferRequest" in service_messages
    missing = {m: sorted(set(theirs["messages"][m]) - set(ours["messages"][m])) for m in service_messages}
    assert {m: f for m, f in missing.items() if f} == {}


# ------------------------------------------------------------------ tritonclient over loopback

COLOR = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)  # what tritonclient_probe.py sends
DEPTH = (np.arange(4 * 5, dtype=np.uint16) * 1000).reshape(4, 5)
ENCODED = b"\x89PNG\r\n\x1a\n not really"
MASKS = [b"PPYo0", b"ab1"]


def bytes_tensor(items: list[bytes]) -> bytes:
    """KServe v2 raw BYTES: each element prefixed by its length (uint32, little-endian)."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def outputs() -> dict[str, tuple[str, list[int], bytes]]:
    return {
        "boxes": ("FP32", [2, 4], np.array([[1, 2, 3, 4], [5.5, 6, 7, 8]], "<f4").tobytes()),
        "scores": ("FP32", [2], np.array([0.875, 0.5], "<f4").tobytes()),
        "classes": ("INT32", [2], np.array([1, 3], "<i4").tobytes()),
        "masks": ("BYTES", [2], bytes_tensor(MASKS)),
    }


class WireFixture(pb_grpc.GRPCInferenceServiceServicer):
    """Answers every declared call for model "maskrcnn" with fixed data and keeps the
    requests, so that the test can check both directions of the wire."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.lock = threading.Lock()

    def _keep(self, request: Any) -> None:
        with self.lock:
            self.requests.append(request)

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name == "maskrcnn")

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="deep-detection", version="0.1.0",
                                         extensions=["model_configuration", "statistics", "system_shared_memory"])

    def ModelMetadata(self, request, context):
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name, versions=["1"], platform="pytorch_maskrcnn",
            inputs=[tensor(name="color", datatype="UINT8", shape=[-1, -1, 3]),
                    tensor(name="depth", datatype="UINT16", shape=[-1, -1])],
            outputs=[tensor(name=n, datatype=d, shape=[-1, *s[1:]]) for n, (d, s, _) in outputs().items()])

    def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(config=mc.ModelConfig(
            name=request.name, platform="pytorch_maskrcnn", backend="deep-detection", max_batch_size=8,
            input=[mc.ModelInput(name="color", data_type=mc.TYPE_UINT8, format=mc.ModelInput.FORMAT_NHWC,
                                 dims=[-1, -1, 3])],
            output=[mc.ModelOutput(name="scores", data_type=mc.TYPE_FP32, dims=[-1])],
            instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_GPU, count=2, gpus=[0, 1])],
            dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=2000),
            parameters={"SCORE_THRESH_TEST": mc.ModelParameter(string_value="0.8")}))

    def ModelStatistics(self, request, context):
        duration = pb.StatisticDuration
        return pb.ModelStatisticsResponse(model_stats=[pb.ModelStatistics(
            name="maskrcnn", version="1", inference_count=7, execution_count=3,
            inference_stats=pb.InferStatistics(success=duration(count=7, ns=7_000_000), queue=duration(count=7, ns=1)),
            batch_stats=[pb.InferBatchStatistics(batch_size=4, compute_infer=duration(count=1, ns=5))])])

    def RepositoryIndex(self, request, context):
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name="maskrcnn", version="1", state="READY")])

    def SystemSharedMemoryRegister(self, request, context):
        self._keep(request)
        return pb.SystemSharedMemoryRegisterResponse()

    def SystemSharedMemoryStatus(self, request, context):
        region = next(r for r in reversed(self.requests) if isinstance(r, pb.SystemSharedMemoryRegisterRequest))
        status = pb.SystemSharedMemoryStatusResponse.RegionStatus(
            name=region.name, key=region.key, offset=region.offset, byte_size=region.byte_size)
        return pb.SystemSharedMemoryStatusResponse(regions={region.name: status})

    def SystemSharedMemoryUnregister(self, request, context):
        self._keep(request)
        return pb.SystemSharedMemoryUnregisterResponse()

    def _infer(self, request: Any) -> Any:
        self._keep(request)
        table = outputs()
        names = [o.name for o in request.outputs] or list(table)
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        response.parameters["height"].int64_param = 4
        response.parameters["width"].int64_param = 5
        for name in names:
            datatype, shape, raw = table[name]
            response.outputs.add(name=name, datatype=datatype, shape=shape)
            response.raw_output_contents.append(raw)
        return response

    def ModelInfer(self, request, context):
        if request.model_name != "maskrcnn":
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model_name!r}")
        return self._infer(request)

    def ModelStreamInfer(self, request_iterator, context) -> Iterator[Any]:
        for request in request_iterator:
            if request.model_name != "maskrcnn":
                self._keep(request)
                yield pb.ModelStreamInferResponse(error_message=f"unknown model {request.model_name!r}")
            else:
                yield pb.ModelStreamInferResponse(infer_response=self._infer(request))


@pytest.fixture(scope="module")
def probed() -> tuple[dict[str, Any], list[Any]]:
    """Runs tests/tritonclient_probe.py against the fixture service; returns what the
    client printed and what the service received."""
    python = tritonclient_env.tritonclient_python()  # before the server: making it may take a while
    assert python.exists()
    service = WireFixture()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        done = tritonclient_env.run(HERE / "tritonclient_probe.py", f"127.0.0.1:{port}")
    finally:
        server.stop(grace=None)
    return json.loads(done.stdout), service.requests


def expected_result(request_id: str, names: tuple[str, ...]) -> dict[str, Any]:
    dtypes = {"FP32": "float32", "INT32": "int32", "BYTES": "object"}
    table = outputs()
    tensors = {}
    for name in names:
        datatype, shape, raw = table[name]
        values = ([m.hex() for m in MASKS] if datatype == "BYTES"
                  else np.frombuffer(raw, {"FP32": "<f4", "INT32": "<i4"}[datatype]).tolist())
        tensors[name] = {"dtype": dtypes[datatype], "shape": shape, "values": values}
    return {"id": request_id, "model_name": "maskrcnn", "model_version": "1", "outputs": list(names),
            "tensors": tensors, "parameters": {"height": {"int64Param": "4"}, "width": {"int64Param": "5"}}}


def test_tritonclient_reads_health_metadata_config_statistics_and_index(probed) -> None:
    got, _ = probed
    assert (got["live"], got["ready"], got["model_ready"], got["unknown_model_ready"]) == (True, True, True, False)
    assert got["server_metadata"]["extensions"] == ["model_configuration", "statistics", "system_shared_memory"]
    meta = got["model_metadata"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("color", "UINT8", ["-1", "-1", "3"]), ("depth", "UINT16", ["-1", "-1"])]  # int64 as JSON strings
    assert [t["name"] for t in meta["outputs"]] == ["boxes", "scores", "classes", "masks"]
    config = got["model_config"]["config"]
    assert config["max_batch_size"] == 8 and config["backend"] == "deep-detection"
    assert config["input"] == [{"name": "color", "data_type": "TYPE_UINT8", "format": "FORMAT_NHWC",
                                "dims": ["-1", "-1", "3"]}]
    assert config["instance_group"] == [{"kind": "KIND_GPU", "count": 2, "gpus": [0, 1]}]
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": "2000"}
    assert config["parameters"] == {"SCORE_THRESH_TEST": {"string_value": "0.8"}}
    stats = got["statistics"]["model_stats"][0]
    assert (stats["inference_count"], stats["execution_count"]) == ("7", "3")
    assert stats["inference_stats"]["success"] == {"count": "7", "ns": "7000000"}
    assert stats["batch_stats"][0]["batch_size"] == "4"
    assert got["index"]["models"] == [{"name": "maskrcnn", "version": "1", "state": "READY"}]


def test_tritonclient_registers_and_unregisters_system_shared_memory(probed) -> None:
    got, requests = probed
    assert got["shm_status"]["regions"]["region0"] == {
        "name": "region0", "key": "/dd_probe_key", "offset": "64", "byte_size": "4096"}
    register = [r for r in requests if isinstance(r, pb.SystemSharedMemoryRegisterRequest)]
    unregister = [r for r in requests if isinstance(r, pb.SystemSharedMemoryUnregisterRequest)]
    assert [(r.name, r.key, r.offset, r.byte_size) for r in register] == [("region0", "/dd_probe_key", 64, 4096)]
    assert [r.name for r in unregister] == ["region0"]


def test_tritonclient_raw_inputs_and_outputs_cross_the_wire_unchanged(probed) -> None:
    got, requests = probed
    request = next(r for r in requests if isinstance(r, pb.ModelInferRequest) and r.id == "raw-1")
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [
        ("color", "UINT8", [4, 5, 3]), ("depth", "UINT16", [4, 5])]
    assert list(request.raw_input_contents) == [COLOR.tobytes(), DEPTH.astype("<u2").tobytes()]
    assert request.parameters["score_threshold"].WhichOneof("parameter_choice") == "double_param"
    assert request.parameters["score_threshold"].double_param == 0.25
    assert [o.name for o in request.outputs] == ["boxes", "scores", "classes", "masks"]
    assert got["infer_raw"] == expected_result("raw-1", ("boxes", "scores", "classes", "masks"))


def test_tritonclient_encoded_image_is_a_length_prefixed_bytes_tensor(probed) -> None:
    got, requests = probed
    request = next(r for r in requests if isinstance(r, pb.ModelInferRequest) and r.inputs[0].datatype == "BYTES")
    assert [(t.name, list(t.shape)) for t in request.inputs] == [("color", [1])]
    assert list(request.raw_input_contents) == [bytes_tensor([ENCODED])]
    assert got["infer_encoded"] == expected_result("", ("boxes",))  # only the output asked for


def test_tritonclient_sees_statuses_and_unimplemented_calls(probed) -> None:
    got, _ = probed
    assert got["infer_unknown_model"] == {"status": "StatusCode.NOT_FOUND", "message": "unknown model 'nope'"}
    assert got["load_model"]["status"] == "StatusCode.UNIMPLEMENTED"


def test_tritonclient_streams_results_and_errors(probed) -> None:
    got, _ = probed
    assert got["stream"] == sorted(
        [expected_result("stream-1", ("boxes", "scores", "classes", "masks")),
         {"error": {"status": None, "message": "unknown model 'nope'"}}],
        key=lambda item: json.dumps(item, sort_keys=True))
