"""Calls a GRPCInferenceService with NVIDIA's tritonclient and prints what it got, as JSON.

Runs in tritonclient's own environment (tests/tritonclient_env.py), not in the
test process:

    python tritonclient_probe.py 127.0.0.1:PORT

The server (tests/integration/test_kserve_proto.py) serves model "maskrcnn" and records the
requests it receives; the test compares both sides. Only tritonclient's public
API is used, so what passes here is what a user's tritonclient code sees.
"""

from __future__ import annotations

import json
import queue
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from google.protobuf.json_format import MessageToDict
from tritonclient.utils import InferenceServerException

OUTPUTS = ("boxes", "scores", "classes", "masks")


def result_as_json(result: grpcclient.InferResult, names: tuple[str, ...]) -> dict[str, Any]:
    response = result.get_response()
    tensors = {}
    for name in names:
        array = result.as_numpy(name)
        if array is None:
            continue
        values = [v.hex() for v in array.reshape(-1)] if array.dtype == np.object_ else array.reshape(-1).tolist()
        tensors[name] = {"dtype": str(array.dtype), "shape": list(array.shape), "values": values}
    return {"id": response.id, "model_name": response.model_name, "model_version": response.model_version,
            "outputs": [o.name for o in response.outputs], "tensors": tensors,
            "parameters": {k: MessageToDict(v) for k, v in response.parameters.items()}}


def raw_inputs() -> list[grpcclient.InferInput]:
    color = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    depth = (np.arange(4 * 5, dtype=np.uint16) * 1000).reshape(4, 5)
    inputs = [grpcclient.InferInput("color", [4, 5, 3], "UINT8"), grpcclient.InferInput("depth", [4, 5], "UINT16")]
    inputs[0].set_data_from_numpy(color)
    inputs[1].set_data_from_numpy(depth)
    return inputs


def error_as_json(error: InferenceServerException) -> dict[str, Any]:
    return {"status": error.status(), "message": error.message()}


def main(url: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    client = grpcclient.InferenceServerClient(url=url)
    out["live"] = client.is_server_live()
    out["ready"] = client.is_server_ready()
    out["model_ready"] = client.is_model_ready("maskrcnn")
    out["unknown_model_ready"] = client.is_model_ready("nope")
    out["server_metadata"] = client.get_server_metadata(as_json=True)
    out["model_metadata"] = client.get_model_metadata("maskrcnn", as_json=True)
    out["model_config"] = client.get_model_config("maskrcnn", as_json=True)
    out["statistics"] = client.get_inference_statistics("maskrcnn", as_json=True)
    out["index"] = client.get_model_repository_index(as_json=True)
    client.register_system_shared_memory("region0", "/dd_probe_key", 4096, offset=64)
    out["shm_status"] = client.get_system_shared_memory_status(as_json=True)
    client.unregister_system_shared_memory("region0")

    requested = [grpcclient.InferRequestedOutput(name) for name in OUTPUTS]
    result = client.infer("maskrcnn", raw_inputs(), outputs=requested, request_id="raw-1",
                          parameters={"score_threshold": 0.25})
    out["infer_raw"] = result_as_json(result, OUTPUTS)

    encoded = grpcclient.InferInput("color", [1], "BYTES")
    encoded.set_data_from_numpy(np.array([b"\x89PNG\r\n\x1a\n not really"], dtype=np.object_))
    result = client.infer("maskrcnn", [encoded], outputs=[grpcclient.InferRequestedOutput("boxes")])
    out["infer_encoded"] = result_as_json(result, OUTPUTS)

    try:
        client.infer("nope", [encoded])
        out["infer_unknown_model"] = "no error"
    except InferenceServerException as error:
        out["infer_unknown_model"] = error_as_json(error)

    try:
        client.load_model("maskrcnn")  # not declared by our service: UNIMPLEMENTED
        out["load_model"] = "no error"
    except InferenceServerException as error:
        out["load_model"] = error_as_json(error)

    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    client.async_stream_infer("maskrcnn", raw_inputs(), request_id="stream-1", outputs=requested)
    client.async_stream_infer("nope", raw_inputs(), request_id="stream-2")
    got = [answers.get(timeout=60) for _ in range(2)]
    client.stop_stream()
    out["stream"] = sorted(
        [result_as_json(r, OUTPUTS) if e is None else {"error": error_as_json(e)} for r, e in got],
        key=lambda item: json.dumps(item, sort_keys=True))
    client.close()
    return out


if __name__ == "__main__":
    json.dump(main(sys.argv[1]), sys.stdout, indent=1, sort_keys=True)
