"""Calls a running deep-detection server with NVIDIA's tritonclient (grpc) and prints what it got, as JSON.

Runs in tritonclient's own environment (tests/tritonclient_env.py), not in the test process:

    python tritonclient_serve_probe.py SPEC.json

SPEC names the server ("url"), the RGB-D model ("model"), the RGB model ("rgb_model") and files the test
prepared: encoded color and depth ("color_file", "depth_file") and the same images decoded
("color_npy", "depth_npy", depth in millimetres). Only tritonclient's public API is used, so what
passes here is what a user's tritonclient code sees.
"""

from __future__ import annotations

import json
import queue
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

OUTPUTS = ("boxes", "scores", "classes", "masks")


def result_json(result: grpcclient.InferResult) -> dict[str, Any]:
    response = result.get_response()
    tensors = {}
    for output in response.outputs:
        array = result.as_numpy(output.name)
        values = [v.hex() for v in array.reshape(-1)] if array.dtype == np.object_ else array.reshape(-1).tolist()
        tensors[output.name] = {"dtype": str(array.dtype), "shape": list(array.shape), "values": values}
    params = {k: (v.int64_param if v.HasField("int64_param") else None) for k, v in response.parameters.items()}
    return {"id": response.id, "model_name": response.model_name, "model_version": response.model_version,
            "outputs": [o.name for o in response.outputs], "tensors": tensors, "parameters": params}


def error_json(error: InferenceServerException) -> dict[str, Any]:
    return {"status": error.status(), "message": error.message()}


def attempt(fn) -> dict[str, Any]:
    try:
        return {"ok": fn()}
    except InferenceServerException as exc:
        return {"error": error_json(exc)}


def tensor(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    t = grpcclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def main(spec: dict[str, Any]) -> dict[str, Any]:
    client = grpcclient.InferenceServerClient(url=spec["url"])
    model, rgb = spec["model"], spec["rgb_model"]
    out: dict[str, Any] = {}
    out["live"] = client.is_server_live()
    out["ready"] = client.is_server_ready()
    out["model_ready"] = client.is_model_ready(model)
    out["unknown_model_ready"] = client.is_model_ready("nope")
    out["server_metadata"] = client.get_server_metadata(as_json=True)
    out["model_metadata"] = client.get_model_metadata(model, as_json=True)
    out["rgb_metadata"] = client.get_model_metadata(rgb, as_json=True)
    out["model_config"] = client.get_model_config(model, as_json=True)
    out["index"] = client.get_model_repository_index(as_json=True)
    out["unknown_metadata"] = attempt(lambda: client.get_model_metadata("nope", as_json=True))

    color_bytes = Path(spec["color_file"]).read_bytes()
    depth_bytes = Path(spec["depth_file"]).read_bytes()
    color = np.load(spec["color_npy"])
    depth = np.load(spec["depth_npy"])
    encoded = [tensor("color", np.array([color_bytes], dtype=np.object_), "BYTES"),
               tensor("depth", np.array([depth_bytes], dtype=np.object_), "BYTES")]
    raw = [tensor("color", color, "UINT8"), tensor("depth", depth, "UINT16")]
    every = [grpcclient.InferRequestedOutput(n) for n in OUTPUTS]

    out["infer_encoded"] = result_json(client.infer(model, encoded, request_id="enc-1"))
    out["infer_raw"] = result_json(client.infer(model, raw, outputs=every, request_id="raw-1"))
    out["infer_metres"] = result_json(client.infer(
        model, [raw[0], tensor("depth", depth.astype(np.float32) / 1000, "FP32")], outputs=every))
    out["infer_subset"] = result_json(client.infer(
        model, raw, outputs=[grpcclient.InferRequestedOutput(n) for n in ("scores", "classes")]))
    out["infer_threshold"] = result_json(client.infer(model, raw, parameters={"score_threshold": 0.9}))
    out["statistics"] = client.get_inference_statistics(model, as_json=True)

    bad_type = tensor("color", color.astype(np.float32), "FP32")
    out["bad_datatype"] = attempt(lambda: client.infer(model, [bad_type, raw[1]]))
    out["missing_depth"] = attempt(lambda: client.infer(model, [raw[0]]))
    out["unknown_model"] = attempt(lambda: client.infer("nope", raw))
    out["unknown_output"] = attempt(lambda: client.infer(model, raw, outputs=[grpcclient.InferRequestedOutput("x")]))
    out["not_an_image"] = attempt(lambda: client.infer(
        model, [tensor("color", np.array([b"not an image"], dtype=np.object_), "BYTES"), raw[1]]))
    out["depth_on_rgb"] = attempt(lambda: client.infer(rgb, raw))
    out["rgb"] = attempt(lambda: result_json(client.infer(rgb, [raw[0]], request_id="rgb-1")))
    out["shm_register"] = attempt(lambda: client.register_system_shared_memory("r0", "/dd_probe", 64))

    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer(model, encoded, request_id="s-1")
    client.async_stream_infer("nope", raw, request_id="s-2")
    client.async_stream_infer(model, raw, request_id="s-3",
                              outputs=[grpcclient.InferRequestedOutput(n) for n in ("boxes", "scores")])
    stream = []
    for _ in range(3):
        result, error = results.get(timeout=120)
        stream.append({"error": error_json(error)} if error is not None else result_json(result))
    client.stop_stream()
    out["stream"] = sorted(stream, key=lambda item: json.dumps(item, sort_keys=True))
    client.close()
    return out


if __name__ == "__main__":
    print(json.dumps(main(json.loads(Path(sys.argv[1]).read_text()))))
