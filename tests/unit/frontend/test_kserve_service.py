"""The KServe adapter over the real request path (a real ring, stand-in workers), in-process on loopback:
what reaches the workers (protocol, outputs, version, masks), ModelStatistics from the reply envelopes,
and a stream's held responses given back once written."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

from dd.frontend.dispatcher import Reply
from dd.frontend.protocols import kserve_v2
from dd.ipc import messages
from dd.proto.inference import grpc_service_pb2 as pb
from dd.proto.inference import grpc_service_pb2_grpc as pb_grpc
from tests.unit.frontend.test_requests import Workers, path_for, ring  # noqa: F401 - ring is a fixture

COLOR = np.arange(64 * 80 * 3, dtype=np.uint8).reshape(64, 80, 3)


class KServeWorkers(Workers):
    """Answers each request with a ModelInferResponse carrying its id, as the worker's encoder would."""

    async def submit_reply(self, req, deadline, rebind, give_up_at=None) -> Reply:
        self.sent.append(req)
        envelope = messages.InferReply(id=req.id, code="OK", queue_us=11, decode_us=22, inference_us=33,
                                       encode_us=44, batch_size=2)
        body = pb.ModelInferResponse(model_name=req.model, model_version=req.model_version, id=req.request_id)
        return Reply("OK", "", body.SerializeToString(), envelope)


def _request(request_id: str, model: str = "rgb", outputs: tuple[str, ...] = ()) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id=request_id)
    req.inputs.add(name="color", datatype="UINT8", shape=list(COLOR.shape))
    req.raw_input_contents.append(COLOR.tobytes())
    for name in outputs:
        req.outputs.add(name=name)
    return req


async def _serve(path, calls):
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(tuple(kserve_v2.handlers(path)))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await calls(pb_grpc.GRPCInferenceServiceStub(channel))
    finally:
        await server.stop(None)


def test_infer_reaches_the_workers_as_a_kserve_request(ring) -> None:  # noqa: F811
    workers = KServeWorkers()
    path = path_for(ring, workers)

    async def calls(stub):
        one = await stub.ModelInfer(_request("a", outputs=("scores", "boxes")), timeout=10)
        two = await stub.ModelInfer(_request("b", outputs=("masks",)), timeout=10)
        stats = await stub.ModelStatistics(pb.ModelStatisticsRequest(name="rgb"), timeout=10)
        return one, two, stats

    one, two, stats = asyncio.run(_serve(path, calls))
    assert (one.id, one.model_version, two.id) == ("a", "1", "b")
    first, second = workers.sent
    assert (first.protocol, list(first.outputs), first.model_version, first.mask_format) == (
        "kserve_v2", ["scores", "boxes"], "1", 1)  # no masks asked: MaskFormat NONE
    assert (list(second.outputs), second.mask_format) == (["masks"], 0)
    assert list(first.color.shape) == [64, 80, 3] and first.request_id == "a"
    s = stats.model_stats[0].inference_stats
    assert (s.success.count, s.queue.count, s.queue.ns, s.compute_infer.ns, s.compute_output.ns) == (
        2, 2, 22_000, 66_000, 88_000)


def test_a_stream_answers_every_request_and_gives_its_held_responses_back(ring) -> None:  # noqa: F811
    workers = KServeWorkers()
    path = path_for(ring, workers)

    async def calls(stub):
        requests = [_request("s1"), _request("s2", model="nope"), _request("s3", outputs=("classes",))]
        responses = [r async for r in stub.ModelStreamInfer(iter(requests), timeout=10)]
        return responses, await stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=10)

    responses, stats = asyncio.run(_serve(path, calls))
    by_id = {r.infer_response.id: r for r in responses}
    assert set(by_id) == {"s1", "s2", "s3"}
    assert by_id["s2"].error_message.startswith("model 'nope' is not served here")
    assert not by_id["s1"].error_message and by_id["s1"].infer_response.model_name == "rgb"
    assert (path.pending, path.held_bytes) == (0, 0)
    assert {m.name: m.inference_stats.success.count for m in stats.model_stats} == {"rgb": 2, "rgbd": 0}
