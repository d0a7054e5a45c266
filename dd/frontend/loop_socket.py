"""A ZeroMQ socket served by the event loop's reader callback instead of zmq.asyncio.

zmq.asyncio makes a future per message received, with a done-callback, a timer to look at the socket
again after each send, and one more wake-up of the awaiting task: on the 2-core CI box the frontend's
main thread spent about a quarter of its time per request in pyzmq's asyncio layer. The frontend's
sockets need none of it: the loop watches the socket's file descriptor, its callback hands each message
to a plain function, and sends are non-blocking calls (every send here is NOBLOCK anyway: credits and
high-water marks bound what is queued).

ZeroMQ's descriptor signals that the socket's state may have changed, not that a message is there, and
only once (edge-triggered); a send can consume that signal too. So the callback reads ZMQ_EVENTS and
receives until no message is left, and after each send the socket is looked at again. The callback
stops after MAX_PER_CALL messages so that a flood cannot hold the loop, and looks again on the loop's
next turn, since the descriptor will not signal those messages again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import zmq

log = logging.getLogger("dd.frontend")

MAX_PER_CALL = 64


class LoopSocket:
    """`sock` (a plain, not an asyncio, socket) read on the running loop's thread: `on_frames` gets each
    multipart message. What `on_frames` raises is logged, and the message dropped."""

    def __init__(self, sock: zmq.Socket, on_frames: Callable[[list[bytes]], None]) -> None:
        self.sock = sock
        self.on_frames = on_frames
        self.loop = asyncio.get_running_loop()
        self.fd = sock.getsockopt(zmq.FD)
        self.loop.add_reader(self.fd, self.drain)
        self.loop.call_soon(self.drain)  # messages queued before the reader was added signal no more

    def send(self, frames: list[bytes]) -> None:
        """Sends at once or raises zmq.Again (no peer, or its queue is full)."""
        self.sock.send_multipart(frames, zmq.NOBLOCK)
        if self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # the send took the descriptor's signal
            self.loop.call_soon(self.drain)

    def drain(self) -> None:
        sock = self.sock
        if sock.closed:
            return
        for _ in range(MAX_PER_CALL):
            if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self.on_frames(frames)
            except Exception:  # noqa: BLE001 - one bad message must not stop the reading
                log.exception("a message of %d frame(s) could not be handled; dropped", len(frames))
        self.loop.call_soon(self.drain)  # more may wait: the descriptor does not signal them again

    def close(self) -> None:
        if not self.sock.closed:
            self.loop.remove_reader(self.fd)
            self.sock.close(linger=0)
