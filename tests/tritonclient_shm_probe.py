"""Client system shared memory against a running deep-detection server (--allow-client-shm), with NVIDIA's
tritonclient and its shared-memory utilities; prints what it got, as JSON.

Runs in tritonclient's own environment (tests/tritonclient_env.py):

    python tritonclient_shm_probe.py SPEC.json

SPEC names the server ("url"), the RGB-D model ("model"), the test image's files ("color_file",
"depth_file") and the same image decoded ("color_npy", "depth_npy", depth in millimetres). Only tritonclient's public API is used (and os.chown, to make a
segment of another user when run as root).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from tritonclient_serve_probe import OUTPUTS, attempt, result_json, tensor

OUT_BYTES = 4 << 20
# Where each output goes in the output region: offset, byte_size.
OUT_LAYOUT = {"boxes": (0, 65536), "scores": (65536, 16384), "classes": (81920, 16384), "masks": (98304, OUT_BYTES - 98304)}
NP_TYPES = {"FP32": np.float32, "INT32": np.int32, "BYTES": np.object_}


def shm_input(name: str, array: np.ndarray, datatype: str, region: str, offset: int) -> grpcclient.InferInput:
    t = grpcclient.InferInput(name, list(array.shape), datatype)
    t.set_shared_memory(region, array.nbytes, offset=offset)
    return t


def from_region(result: grpcclient.InferResult, handle: Any) -> dict[str, Any]:
    """The outputs the server wrote into the output region, read as a tritonclient user reads them."""
    response = result.get_response()
    tensors, written = {}, {}
    for output in response.outputs:
        offset, _ = OUT_LAYOUT[output.name]
        shape = list(output.shape)
        array = shm.get_contents_as_numpy(handle, NP_TYPES[output.datatype], shape, offset)
        values = [v.hex() for v in array.reshape(-1)] if array.dtype == np.object_ else array.reshape(-1).tolist()
        tensors[output.name] = {"dtype": str(array.dtype), "shape": shape, "values": values}
        written[output.name] = output.parameters["shared_memory_byte_size"].int64_param
    params = {k: (v.int64_param if v.HasField("int64_param") else None) for k, v in response.parameters.items()}
    return {"id": response.id, "outputs": [o.name for o in response.outputs], "tensors": tensors,
            "parameters": params, "raw_lengths": [len(r) for r in response.raw_output_contents], "written": written}


def serialized(item: bytes) -> bytes:
    """A BYTES tensor of one element, serialized as tritonclient puts it in a region."""
    out = serialize_byte_tensor(np.array([item], dtype=np.object_))
    return out.item() if out.dtype == np.object_ else out.tobytes()


def main(spec: dict[str, Any]) -> dict[str, Any]:
    client = grpcclient.InferenceServerClient(url=spec["url"])
    model = spec["model"]
    color = np.load(spec["color_npy"])
    depth = np.load(spec["depth_npy"])
    pid = os.getpid()
    in_key, out_key, other_key = f"/dd_probe_in_{pid}", f"/dd_probe_out_{pid}", f"/dd_probe_other_{pid}"
    out: dict[str, Any] = {"extensions": client.get_server_metadata(as_json=True)["extensions"]}

    # Inputs: color then depth in one region, as tritonclient's examples lay them out.
    in_handle = shm.create_shared_memory_region("in", in_key, color.nbytes + depth.nbytes)
    shm.set_shared_memory_region(in_handle, [color, depth])
    out_handle = shm.create_shared_memory_region("out", out_key, OUT_BYTES)
    client.register_system_shared_memory("in", in_key, color.nbytes + depth.nbytes)
    client.register_system_shared_memory("out", out_key, OUT_BYTES)
    out["status"] = client.get_system_shared_memory_status(as_json=True)

    every = [grpcclient.InferRequestedOutput(n) for n in OUTPUTS]
    raw = [tensor("color", color, "UINT8"), tensor("depth", depth, "UINT16")]
    in_shm = [shm_input("color", color, "UINT8", "in", 0), shm_input("depth", depth, "UINT16", "in", color.nbytes)]
    out["message"] = result_json(client.infer(model, raw, outputs=every, request_id="msg"))
    # Several times: with two frontends, registration and inference need not land on the same one.
    out["shm_inputs"] = [result_json(client.infer(model, in_shm, outputs=every, request_id=f"shm-{i}"))
                         for i in range(3)]
    # Encoded images (BYTES) from shared memory too.
    encoded = [serialized(Path(spec[f]).read_bytes()) for f in ("color_file", "depth_file")]
    enc_handle = shm.create_shared_memory_region("enc", f"/dd_probe_enc_{pid}", sum(map(len, encoded)))
    shm.set_shared_memory_region(enc_handle, [np.frombuffer(e, np.uint8) for e in encoded])
    client.register_system_shared_memory("enc", f"/dd_probe_enc_{pid}", sum(map(len, encoded)))
    enc_inputs = []
    for name, data, offset in (("color", encoded[0], 0), ("depth", encoded[1], len(encoded[0]))):
        t = grpcclient.InferInput(name, [1], "BYTES")
        t.set_shared_memory("enc", len(data), offset=offset)
        enc_inputs.append(t)
    out["shm_encoded"] = result_json(client.infer(model, enc_inputs, outputs=every, request_id="enc"))
    out["mixed"] = result_json(client.infer(model, [in_shm[0], raw[1]], outputs=every, request_id="mixed"))

    to_shm = []
    for name in OUTPUTS:
        o = grpcclient.InferRequestedOutput(name)
        offset, size = OUT_LAYOUT[name]
        o.set_shared_memory("out", size, offset=offset)
        to_shm.append(o)
    out["shm_outputs"] = from_region(client.infer(model, in_shm, outputs=to_shm, request_id="out"), out_handle)
    small = grpcclient.InferRequestedOutput("boxes")
    small.set_shared_memory("out", 4)
    out["output_too_small"] = attempt(lambda: client.infer(model, in_shm, outputs=[small]))

    # Refusals.
    past_end = [shm_input("color", color, "UINT8", "in", depth.nbytes + 1), raw[1]]
    out["input_past_region"] = attempt(lambda: client.infer(model, past_end))
    out["unknown_region"] = attempt(lambda: client.infer(model, [shm_input("color", color, "UINT8", "nope", 0),
                                                                 raw[1]]))
    out["register_twice"] = attempt(lambda: client.register_system_shared_memory("in", in_key, 16))
    out["register_missing_key"] = attempt(lambda: client.register_system_shared_memory("x", "/dd_no_such_key", 16))
    out["register_too_large"] = attempt(lambda: client.register_system_shared_memory("x", in_key, OUT_BYTES * 4))
    other = shm.create_shared_memory_region("other", other_key, 64)
    if os.geteuid() == 0:
        os.chown("/dev/shm" + other_key, 12345, 12345)
        out["register_other_user"] = attempt(lambda: client.register_system_shared_memory("o", other_key, 64))

    client.unregister_system_shared_memory("in")
    out["status_after_unregister"] = client.get_system_shared_memory_status(as_json=True)
    out["infer_after_unregister"] = attempt(lambda: client.infer(model, in_shm))
    client.unregister_system_shared_memory()
    out["status_after_unregister_all"] = client.get_system_shared_memory_status(as_json=True)
    for handle in (in_handle, out_handle, other, enc_handle):
        shm.destroy_shared_memory_region(handle)
    client.close()
    return out


if __name__ == "__main__":
    try:
        print(json.dumps(main(json.loads(Path(sys.argv[1]).read_text()))))
    except InferenceServerException as exc:
        print(json.dumps({"failed": {"status": exc.status(), "message": exc.message()}}))
        raise
