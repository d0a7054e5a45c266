"""dd.worker.reply_routes on real ZeroMQ sockets: the inference thread's routes to the frontends' reply
sockets, and their refusals, each of which sends the caller's reply through the I/O thread instead."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import zmq

from dd.worker import reply_routes
from dd.worker.reply_routes import ReplyRoutes


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.term()


def _pull(ctx: zmq.Context, path: Path) -> tuple[zmq.Socket, str]:
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    address = f"ipc://{path}"
    sock.bind(address)
    return sock, address


def _sent_once_connected(routes: ReplyRoutes, identity: bytes, frames: list, timeout: float = 30.0) -> None:
    """send() until the route's connection is up (ipc connects asynchronously; a busy machine may take long)."""
    end = time.monotonic() + timeout
    while not routes.send(identity, frames):
        assert time.monotonic() < end, "the route never connected"
        time.sleep(0.01)


def test_a_reply_goes_to_the_frontend_named_socket_after_the_worker_name(ctx: zmq.Context, tmp_path: Path) -> None:
    pull, address = _pull(ctx, tmp_path / "fe.ipc")
    routes = ReplyRoutes(ctx, b"model.0")
    try:
        assert not routes.send(b"fe-1", [b"R", b"envelope"])  # no route told: through the I/O thread
        routes.tell(b"fe-1", address)
        _sent_once_connected(routes, b"fe-1", [b"R", b"envelope", b"body"])
        assert pull.poll(10_000)
        assert pull.recv_multipart() == [b"model.0", b"R", b"envelope", b"body"]
        assert not routes.send(b"fe-2", [b"R", b"x"])  # another frontend: no route
    finally:
        routes.close()
        pull.close()


def test_a_forgotten_route_takes_nothing_and_a_new_address_replaces_the_old(ctx: zmq.Context, tmp_path: Path) -> None:
    first, first_address = _pull(ctx, tmp_path / "a.ipc")
    second, second_address = _pull(ctx, tmp_path / "b.ipc")
    routes = ReplyRoutes(ctx, b"model.0")
    try:
        routes.tell(b"fe-1", first_address)
        _sent_once_connected(routes, b"fe-1", [b"R", b"1"])
        routes.tell(b"fe-1", second_address)  # the frontend names another socket
        _sent_once_connected(routes, b"fe-1", [b"R", b"2"])
        assert second.poll(10_000) and second.recv_multipart() == [b"model.0", b"R", b"2"]
        assert first.poll(10_000) and first.recv_multipart() == [b"model.0", b"R", b"1"]
        assert not first.poll(100)  # nothing more went to the old one
        routes.tell(b"fe-1", "")  # its frontend is gone
        assert not routes.send(b"fe-1", [b"R", b"3"]) and len(routes) == 0
    finally:
        routes.close()
        first.close()
        second.close()


def test_a_route_not_connected_or_full_refuses_without_blocking(ctx: zmq.Context, tmp_path: Path) -> None:
    routes = ReplyRoutes(ctx, b"model.0", hwm=2)
    try:
        routes.tell(b"fe-1", f"ipc://{tmp_path / 'nobody.ipc'}")  # a frontend whose socket is not there
        routes.apply()
        assert len(routes) == 1 and not routes.send(b"fe-1", [b"R", b"x"])
        pull, address = _pull(ctx, tmp_path / "slow.ipc")
        pull.setsockopt(zmq.RCVHWM, 1)
        routes.tell(b"fe-2", address)
        _sent_once_connected(routes, b"fe-2", [b"R", b"0"])
        # A frontend that stops reading: the socket buffers and the route's queue fill, then it refuses (the
        # I/O thread's turn). 1000 replies of 64 KB are more than both kernel buffers hold (4 MiB each at most).
        body = bytes(64 * 1024)
        sent = 0
        while sent < 1000 and routes.send(b"fe-2", [b"R", body]):
            sent += 1
        assert sent < 1000, "a frontend that reads nothing took 1000 replies of 64 KB"
        pull.close()
    finally:
        routes.close()


def test_routes_are_bounded(ctx: zmq.Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reply_routes, "MAX_ROUTES", 2)
    routes = ReplyRoutes(ctx, b"model.0")
    try:
        for i in range(3):
            routes.tell(f"fe-{i}".encode(), f"ipc://{tmp_path / f'{i}.ipc'}")
        routes.apply()
        assert len(routes) == 2
    finally:
        routes.close()
