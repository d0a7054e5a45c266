"""dd.frontend.protocols.kserve_v2 without a server: the stream wrapper built around the worker's bytes."""

from __future__ import annotations

import pytest

from dd.frontend.protocols.kserve_v2 import stream_error, stream_response
from dd.proto.inference import grpc_service_pb2 as pb


@pytest.mark.parametrize("payload", [0, 1, 127, 128, 300, 16383, 16384, 70_000, 3_000_000])
def test_the_stream_wrapper_is_what_protobuf_would_serialize(payload: int) -> None:
    inner = pb.ModelInferResponse(model_name="m", id="r")
    inner.raw_output_contents.append(b"x" * payload)
    body = inner.SerializeToString()
    wrapped = stream_response(body)
    assert wrapped == pb.ModelStreamInferResponse(infer_response=inner).SerializeToString()
    assert pb.ModelStreamInferResponse.FromString(wrapped).infer_response == inner


def test_an_empty_response_is_still_an_infer_response() -> None:
    parsed = pb.ModelStreamInferResponse.FromString(stream_response(b""))
    assert parsed.HasField("infer_response") and not parsed.error_message


def test_a_stream_error_carries_the_requests_id_and_a_bounded_message() -> None:
    request = pb.ModelInferRequest(model_name="m", id="r" * 1000, model_version="1")
    parsed = pb.ModelStreamInferResponse.FromString(stream_error(request, "bad " * 2000))
    assert parsed.infer_response.id == "r" * 256 and parsed.infer_response.model_name == "m"
    assert parsed.error_message.startswith("bad ") and len(parsed.error_message) == 2048
