"""dd/frontend/loop_socket.py on real ZeroMQ sockets in a real event loop.

ZeroMQ's descriptor signals edges, and a send on a socket can take the signal that a message arrived:
a reader that missed it would leave that message unread until the next one came. The ping-pong below
answers every send at once, so a lost signal shows as a round that never ends (bounded, not timed)."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
import zmq

from dd.frontend.loop_socket import MAX_PER_CALL, LoopSocket


def _pair(ctx: zmq.Context, kind_a: int, kind_b: int) -> tuple[zmq.Socket, zmq.Socket]:
    a, b = ctx.socket(kind_a), ctx.socket(kind_b)
    a.setsockopt(zmq.LINGER, 0)
    b.setsockopt(zmq.LINGER, 0)
    port = a.bind_to_random_port("tcp://127.0.0.1")
    b.connect(f"tcp://127.0.0.1:{port}")
    return a, b


def test_messages_queued_before_and_a_flood_are_all_read_without_holding_the_loop() -> None:
    ctx = zmq.Context()
    pull, push = _pair(ctx, zmq.PULL, zmq.PUSH)
    n = 3 * MAX_PER_CALL + 5
    for k in range(n):
        push.send_multipart([b"m", str(k).encode()])

    async def main() -> tuple[list[int], int]:
        got: list[int] = []
        while not pull.poll(0):  # the messages are in the socket before the reader exists
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        reader = LoopSocket(pull, lambda frames: got.append(int(frames[1])))
        seen_by_other_work: list[int] = []
        asyncio.get_running_loop().call_soon(lambda: seen_by_other_work.append(len(got)))
        try:
            for _ in range(1000):
                if len(got) == n:
                    break
                await asyncio.sleep(0.01)
        finally:
            reader.close()
        return got, seen_by_other_work[0]

    try:
        got, seen = asyncio.run(main())
    finally:
        push.close()
        ctx.term()
    assert got == list(range(n))
    assert seen <= MAX_PER_CALL  # other callbacks ran between the reader's turns


def test_replies_that_race_the_sends_are_never_missed() -> None:
    ctx = zmq.Context()
    router, dealer = _pair(ctx, zmq.ROUTER, zmq.DEALER)
    rounds = 2000
    stop = threading.Event()

    def echo() -> None:
        while not stop.is_set():
            if router.poll(50):
                ident, *body = router.recv_multipart()
                router.send_multipart([ident, *body])

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()

    async def main() -> int:
        loop = asyncio.get_running_loop()
        waiting: dict[bytes, asyncio.Future] = {}
        sock = LoopSocket(dealer, lambda frames: waiting.pop(frames[0]).set_result(frames[1]))
        done = 0
        try:
            for k in range(rounds):  # two sends a round: the first one's echo may arrive during the second
                futs = []
                for key in (b"a%d" % k, b"b%d" % k):
                    waiting[key] = fut = loop.create_future()
                    futs.append(fut)
                    sock.send([key, b"x"])
                try:
                    await asyncio.wait_for(asyncio.gather(*futs), timeout=20)
                except asyncio.TimeoutError:
                    break  # an echo that arrived was never read
                done += 1
        finally:
            sock.close()
        return done

    try:
        assert asyncio.run(main()) == rounds, "a reply was left unread"
    finally:
        stop.set()
        thread.join(5)
        router.close()
        ctx.term()


def test_a_message_the_handler_cannot_take_is_logged_and_the_next_is_read(caplog: pytest.LogCaptureFixture) -> None:
    ctx = zmq.Context()
    pull, push = _pair(ctx, zmq.PULL, zmq.PUSH)

    def handle(frames: list[bytes]) -> None:
        if frames[0] == b"bad":
            raise ValueError("malformed")
        got.append(frames[0])

    got: list[bytes] = []

    async def main() -> None:
        reader = LoopSocket(pull, handle)
        push.send(b"bad")
        push.send(b"good")
        try:
            for _ in range(1000):
                if got:
                    break
                await asyncio.sleep(0.01)
        finally:
            reader.close()
        assert reader.sock.closed
        reader.close()  # twice is harmless

    with caplog.at_level(logging.ERROR, logger="dd.frontend"):
        try:
            asyncio.run(main())
        finally:
            push.close()
            ctx.term()
    assert got == [b"good"]
    assert "could not be handled" in caplog.text and "malformed" in caplog.text


def test_send_raises_again_when_no_peer_takes_it() -> None:
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.IMMEDIATE, 1)
    dealer.connect("ipc:///nonexistent/dd-loop-socket-test.ipc")

    async def main() -> None:
        sock = LoopSocket(dealer, lambda frames: None)
        with pytest.raises(zmq.Again):
            sock.send([b"x"])
        sock.close()

    try:
        asyncio.run(main())
    finally:
        ctx.term()
