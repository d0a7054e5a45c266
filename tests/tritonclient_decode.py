"""Decodes serialized ModelInferResponse bytes with NVIDIA's tritonclient and prints them as JSON.

Runs in tritonclient's own environment (tests/tritonclient_env.py):

    python tritonclient_decode.py RESPONSE_FILE [RESPONSE_FILE ...]

For each file: the response's id, model name and version, output names and parameters, and each
output as tritonclient's InferResult.as_numpy gives it (BYTES elements as hex), so that a test can
check that what our worker encodes is what a user's tritonclient code reads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from google.protobuf.json_format import MessageToDict
from tritonclient.grpc import service_pb2


def decode(data: bytes) -> dict[str, Any]:
    response = service_pb2.ModelInferResponse.FromString(data)
    result = grpcclient.InferResult(response)
    tensors = {}
    for output in response.outputs:
        array = result.as_numpy(output.name)
        values = [v.hex() for v in array.reshape(-1)] if array.dtype == np.object_ else array.reshape(-1).tolist()
        tensors[output.name] = {"dtype": str(array.dtype), "shape": list(array.shape), "values": values}
    return {"id": response.id, "model_name": response.model_name, "model_version": response.model_version,
            "outputs": [o.name for o in response.outputs], "tensors": tensors,
            "parameters": {k: MessageToDict(v) for k, v in response.parameters.items()}}


if __name__ == "__main__":
    print(json.dumps([decode(Path(p).read_bytes()) for p in sys.argv[1:]]))
