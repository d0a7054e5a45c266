"""deep_detection.v1 (gRPC): the frontend's Status -> gRPC status codes, and the in-stream error body.

The gRPC handlers themselves are still methods of dd.frontend.server.Frontend; this module is
where everything gRPC-specific about detector_v1 errors lives.
"""

from __future__ import annotations

import grpc

from dd.frontend.errors import Status
from dd.proto.deep_detection.v1 import detector_pb2 as pb

PROTOCOL = "detector_v1"  # ipc InferRequest.protocol: the worker's encoder for this protocol


def grpc_code(status: Status) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, status.value, grpc.StatusCode.INTERNAL)


def error_body(request_id: str, model: str, status: Status, message: str) -> bytes:
    """A DetectStream response for a failed request (the caller cuts what it echoes to its limits)."""
    return pb.DetectResponse(request_id=request_id, model=model, error_code=grpc_code(status).value[0],
                             error_message=message).SerializeToString()
