"""A traced request (metadata `dd-trace`) gets its hops back, in order, from a real server; others get none."""

from __future__ import annotations

import asyncio
import json

import grpc
import numpy as np
import pytest

from dd.client import AsyncDetectorClient, DetectorClient
from dd.frontend.inputs import HOPS
from dd.proto.inference import grpc_service_pb2 as kpb
from dd.proto.inference import grpc_service_pb2_grpc as kpb_grpc
from tests.conftest import scene
from tests.serverproc import ServerProcess

# Every hop a traced unary call passes, in order: the client's, the adapter's and the request path's.
ORDER = ("client_sent", "handler", *HOPS, "returned", "client_received")


def assert_in_order(trace: dict[str, float]) -> None:
    assert list(trace) == list(ORDER)
    times = [trace[k] for k in ORDER]
    assert all(t > 0 for t in times), trace
    # One host, one clock: each hop is passed after the one before it.
    assert times == sorted(times), {k: round(trace[k] - trace["client_sent"], 6) for k in ORDER}


def test_a_traced_detect_gets_its_hops_in_order(server: ServerProcess) -> None:
    color, depth = scene(7)
    with DetectorClient(server.target) as client:
        request = client.make_request(color, depth, model="rgbd", request_id="t1")
        traced = client.detect_request(request, trace=True)
        plain = client.detect_request(request)
    assert traced.trace is not None and plain.trace is None
    assert_in_order(traced.trace)
    assert traced.request_id == "t1" and len(traced.instances) == len(plain.instances)


def test_the_async_client_traces_too(server: ServerProcess) -> None:
    color, depth = scene(8)

    async def run():
        async with AsyncDetectorClient(server.target) as client:
            return await client.detect_request(client.make_request(color, depth, model="null"), trace=True)

    assert_in_order(asyncio.run(run()).trace)


@pytest.mark.parametrize("asked", [True, False])
def test_kserve_model_infer_answers_the_trace_in_its_trailing_metadata(server: ServerProcess, asked: bool) -> None:
    color, depth = scene(9)
    request = kpb.ModelInferRequest(model_name="null")
    request.inputs.add(name="color", datatype="UINT8", shape=list(color.shape))
    request.inputs.add(name="depth", datatype="UINT16", shape=list(depth.shape))
    request.raw_input_contents.extend([color.tobytes(), depth.tobytes()])
    with grpc.insecure_channel(server.target) as channel:
        _, call = kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(
            request, timeout=30, metadata=[("dd-trace", "1")] if asked else None)
    trailing = dict(call.trailing_metadata() or ())
    if not asked:
        assert "dd-trace" not in trailing
        return
    trace = json.loads(trailing["dd-trace"])
    keys = ("handler", *HOPS, "returned")
    assert list(trace) == list(keys)
    times = np.array([trace[k] for k in keys])
    assert (times > 0).all() and (np.diff(times) >= 0).all(), trace
