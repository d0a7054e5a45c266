"""The frontend's one error type and its status, mapped to gRPC codes only in the detector_v1 adapter."""

from __future__ import annotations

import grpc
import pytest

from dd.frontend.errors import ServeError, Status
from dd.frontend.protocols.detector_v1 import error_body, grpc_code
from dd.proto.deep_detection.v1 import detector_pb2 as pb


@pytest.mark.parametrize("status", list(Status))
def test_every_status_is_a_grpc_code_of_the_same_name(status: Status) -> None:
    assert grpc_code(status).name == status.value


def test_a_worker_code_this_frontend_does_not_know_is_internal() -> None:
    assert Status.from_name("RESOURCE_EXHAUSTED") is Status.RESOURCE_EXHAUSTED
    assert Status.from_name("SOMETHING_NEW") is Status.INTERNAL


def test_the_stream_error_body_carries_the_grpc_code() -> None:
    err = ServeError(Status.NOT_FOUND, "no model 'x'")
    resp = pb.DetectResponse.FromString(error_body("r1", "x", err.status, err.message))
    assert (resp.request_id, resp.model, resp.error_code, resp.error_message) == \
        ("r1", "x", grpc.StatusCode.NOT_FOUND.value[0], "no model 'x'")
