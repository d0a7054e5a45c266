"""What bounds the work in flight between a client, a frontend and a worker, on real processes:
a DetectStream whose client reads slowly, a worker queue that must take whatever the frontends'
credits allow, and the per-request path that must not touch health."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc

from dd.config import ServerConfig
from dd.proto.deep_detection.v1 import detector_pb2 as pb
from dd.proto.deep_detection.v1 import detector_pb2_grpc as pb_grpc
from tests.faults import Server, answer_problem, codes, null_case, null_model, run_cases, wait_for

RECHECK_S = 0.25  # Dispatcher._acquire: how often a waiter for a credit looks again without a wake


def _served(srv: Server) -> int:
    """Requests the frontends have read and finished with: each one's slot was taken and given back,
    which bumps the slot's generation twice (dd.ipc.shm_ring.RingUsage.generations)."""
    return sum(r.generations for r in srv.rings()) // 2


def _settled(value, quiet_s: float, timeout: float) -> int:
    """value() once it has not changed for quiet_s seconds."""
    last, since, end = value(), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < end, f"still changing after {timeout} s (last {last})"
        time.sleep(0.05)
        now = value()
        if now != last:
            last, since = now, time.monotonic()
    return last


async def _start_and_wait_ready(dispatcher, model: str = "null") -> None:
    """Starts a frontend Dispatcher of this process and waits until it sees a ready worker."""
    await dispatcher.start()
    end = time.monotonic() + 30
    while dispatcher.ready_workers(model) < 1:
        assert time.monotonic() < end, "the dispatcher never saw the worker ready"
        await asyncio.sleep(0.05)


async def _detect_null(dispatcher, ring, i: int) -> str | None:
    """null_case(i) decoded into a slot of `ring` and sent through `dispatcher`, as the frontend does;
    None if the answer is right, else what is wrong with it."""
    from dd.frontend.decode import decode_into_slot
    from dd.frontend.protocols.detector_v1 import image_inputs
    from dd.ipc import messages

    case = null_case(i, depth=False)
    slot, gen = ring.allocate()
    try:
        decoded = decode_into_slot(*image_inputs(case.request), False, ring.slot_buffer(slot), 1 << 16)  # max pixels
        deadline = time.time() + 60
        req = messages.InferRequest(
            id=dispatcher.next_id(), ring=ring.name, slot=slot, generation=gen,
            color=messages.ArrayRef(offset=decoded.color.offset, shape=decoded.color.shape, dtype=decoded.color.dtype),
            has_depth=False, mask_format=pb.NONE, deadline=deadline, received_at=time.time(),
            request_id=case.request.request_id, model="null")
        body = await dispatcher.submit(req, deadline, rebind=lambda: ring.bump(slot))
        return answer_problem(case, pb.DetectResponse.FromString(body))
    finally:
        ring.free(slot)


def test_stream_window_bounds_what_a_slow_reader_leaves_on_the_frontend(tmp_path: Path) -> None:
    """A client writes 4 x STREAM_WINDOW requests on one DetectStream and reads nothing: the frontend
    stops reading the stream once STREAM_WINDOW responses are in flight or unsent, instead of serving
    all of them and holding every finished response for the client. Once the client reads, all are
    answered, each with its own answer.

    Responses of ~37 KB and no BDP probing on the client keep gRPC's own buffering (one 64 KB
    stream window) to a response or two, so what the frontend read is what it holds."""
    STREAM_WINDOW = ServerConfig(ring_slots=8).resolved_stream_window()  # noqa: N806 - the server's window
    n = 4 * STREAM_WINDOW
    instances = 1000  # boxes only: about 37 KB a response, cheap for the null engine
    null_model(tmp_path / "null", kind="rgb", instances=instances)
    cases = [null_case(i, depth=False, instances=instances) for i in range(n)]
    with Server(tmp_path / "null", ring_slots=8, slot_mb=0.0625) as srv:
        srv.start().wait_serving(120)

        async def scenario() -> tuple[int, list[pb.DetectResponse]]:
            options = [("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 64 << 20)]
            async with grpc.aio.insecure_channel(srv.target, options=options) as ch:
                call = pb_grpc.DetectorStub(ch).DetectStream(timeout=60)

                async def write_all() -> None:
                    for case in cases:
                        await call.write(case.request)
                    await call.done_writing()

                writer = asyncio.create_task(write_all())
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, wait_for, lambda: _served(srv) >= STREAM_WINDOW, 30,
                                           "the frontend to serve a window's worth of the stream")
                held = await loop.run_in_executor(None, _settled, lambda: _served(srv), 1.0, 30)
                responses = [r async for r in call]
                await writer
                return held, responses

        held, responses = asyncio.run(scenario())
        assert _served(srv) == n
    assert held <= STREAM_WINDOW + 4, (
        f"the frontend read and served {held} of the {n} requests of a stream whose client read no response "
        f"(window {STREAM_WINDOW}): it holds their finished responses instead of waiting for the client")
    by_id = {r.request_id: r for r in responses}
    assert len(responses) == n and len(by_id) == n
    problems = [answer_problem(c, by_id[c.request.request_id]) for c in cases]
    assert not any(problems), next(p for p in problems if p)


def test_worker_queue_takes_everything_the_credits_allow(tmp_path: Path) -> None:
    """With 96 credits per worker (--max-inflight-per-worker), a frontend may put 96 requests on one
    worker at once; while its slow engine works through them, most wait in the worker's queue. The
    queue must fit them: a worker that refuses work the frontend was allowed to send ("queue is full",
    RESOURCE_EXHAUSTED) turns a configured limit into failed requests."""
    credits = 96
    null_model(tmp_path / "slow", kind="rgb", batch=4, cost_ms=100)
    with Server(tmp_path / "slow", ring_slots=credits, slot_mb=0.0625,
                args=["--max-inflight-per-worker", str(credits)]) as srv:
        srv.start().wait_serving(120)
        cases = [null_case(i, depth=False) for i in range(credits)]
        outcomes = asyncio.run(run_cases(srv.target, cases, concurrency=credits, timeout=60.0))
        wait_for(lambda: srv.slots_in_use() == 0, 10, "every ring slot to be free")
    refused = [o for o in outcomes if o.code != grpc.StatusCode.OK]
    assert not refused, f"{codes(outcomes)}, e.g. {refused[0].details!r}"
    wrong = [o.problem for o in outcomes if o.problem]
    assert not wrong, wrong[0]


def test_health_is_updated_on_worker_state_changes_not_per_request(tmp_path: Path) -> None:
    """The frontend updates gRPC health from the dispatcher's on_change hook. It must run when a worker's
    state changes (here: becomes ready), and not once per request as credits come back: that cost two
    health-servicer updates (and a task) per request for a status that had not changed.

    A redundant update of an unchanged status cannot be seen through the Health service (Check answers
    the same, Watch sends changes only), so this test drives the frontend's real Dispatcher, in this
    process, against the real workers of a running server, through a ring of its own, and counts the
    hook's calls."""
    from dd.frontend.dispatcher import Dispatcher
    from dd.ipc.shm_ring import ShmRing, segment_name

    n = 40
    null_model(tmp_path / "null", kind="rgb")
    with Server(tmp_path / "null") as srv:
        srv.start().wait_serving(120)

        async def scenario() -> tuple[int, int, list[str | None]]:
            calls: list[float] = []
            dispatcher = Dispatcher(srv.run_dir, lambda model: 4, on_change=lambda: calls.append(time.monotonic()))
            ring = ShmRing.create(segment_name(srv.tag, "test"), 2, 1 << 16)
            try:
                await _start_and_wait_ready(dispatcher)
                at_ready = len(calls)
                problems = [await _detect_null(dispatcher, ring, i) for i in range(n)]
                return at_ready, len(calls) - at_ready, problems
            finally:
                await dispatcher.close()
                ring.close()
                ring.unlink()

        at_ready, per_requests, problems = asyncio.run(scenario())
    assert not any(problems), next(p for p in problems if p)
    assert at_ready >= 1, "on_change did not run when the worker became ready: health would never be SERVING"
    assert per_requests <= 2, (
        f"on_change (the frontend's health update) ran {per_requests} times during {n} requests while no worker "
        "changed state: health is being updated per request")


def test_a_freed_credit_wakes_one_waiter_not_all(tmp_path: Path) -> None:
    """With one credit and 64 requests waiting for it, each reply lets one waiter go: the others
    stay asleep (waking every waiter on every reply costs the frontend's loop waiters x replies
    rescans of the workers at saturation). Counted as the dispatcher's worker picks; all answers
    must still be right."""
    from dd.frontend.dispatcher import Dispatcher
    from dd.ipc.shm_ring import ShmRing, segment_name

    n = 64
    null_model(tmp_path / "null", kind="rgb", cost_ms=5)
    with Server(tmp_path / "null") as srv:
        srv.start().wait_serving(120)

        async def scenario() -> tuple[int, list[str | None]]:
            dispatcher = Dispatcher(srv.run_dir, lambda model: 1, on_change=lambda: None)
            ring = ShmRing.create(segment_name(srv.tag, "test"), n, 1 << 16)
            picks = 0
            pick = dispatcher._pick

            def counting_pick(model: str):
                nonlocal picks
                picks += 1
                return pick(model)

            dispatcher._pick = counting_pick  # type: ignore[method-assign]
            try:
                await _start_and_wait_ready(dispatcher)
                picks = 0
                start = time.monotonic()
                problems = await asyncio.gather(*(_detect_null(dispatcher, ring, i) for i in range(n)))
                return picks, time.monotonic() - start, problems
            finally:
                await dispatcher.close()
                ring.close()
                ring.unlink()

        picks, took, problems = asyncio.run(scenario())
    assert not any(problems), next(p for p in problems if p)
    # One pick to find the credit taken and one after each wake is about 2n; each waiter also looks
    # again every 0.25 s (RECHECK_S) on its own, which on a slow or busy machine adds up to
    # n x took / 0.25: allowed for, so the bound does not depend on the machine's speed. Waking
    # everyone on each reply made it about n x n / 2 (2048 here) whatever the speed.
    allowed = 4 * n + n * took / RECHECK_S
    assert picks <= allowed, (f"{picks} worker picks for {n} requests through one credit in {took:.2f} s "
                              f"(allowed {allowed:.0f}): waiters woken in a herd")
