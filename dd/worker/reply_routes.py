"""The inference thread's own sockets to the frontends: a reply leaves from the thread that made it.

Through the I/O thread, a reply went over an inproc socket to that thread, which had to wake, take the
GIL and send it on through its ROUTER: on the H200 host a lone request's reply took 0.94-1.06 ms from the
inference thread to the frontend, against 0.34-0.41 ms for the request's way there (BENCHMARKS.md, S14).
A frontend names a reply socket of its own in its pings (Ping.reply_to, a PULL); the I/O thread passes it
here, and the inference thread connects a PUSH socket to it and sends that frontend's replies there, each
after a frame with the worker's name (the frontend's link to this worker).

The ROUTER stays the way back whenever a route cannot take a reply: before its connection is up
(ZMQ_IMMEDIATE: nothing is queued for a peer that is not there), with its queue full, or for a frontend
that named no socket. send() then says no and the caller hands the reply to the I/O thread as before.

Thread use: tell() is the I/O thread's; everything else is the inference thread's, which owns the sockets
(ZeroMQ sockets are not shared between threads). The queue between them is the only shared state.
"""

from __future__ import annotations

import logging
import queue
from collections import OrderedDict

import zmq

log = logging.getLogger("dd.worker")

# Routes kept at most: one per frontend, each dropped when its frontend's ring goes; the bound only
# keeps frontends that vanished without a trace (their ring never removed) from adding up.
MAX_ROUTES = 256
# A reply is 1 KB to 1 MB; a socket buffer that holds a whole one takes it in one write (the kernel caps
# this at net.core.wmem_max).
SNDBUF_BYTES = 2 * 1024 * 1024


class ReplyRoutes:
    def __init__(self, ctx: zmq.Context, sender: bytes, hwm: int = 10_000) -> None:
        self._ctx = ctx
        self._sender = sender
        self._hwm = hwm
        self._pending: queue.SimpleQueue[tuple[bytes, str]] = queue.SimpleQueue()
        self._routes: OrderedDict[bytes, tuple[str, zmq.Socket]] = OrderedDict()

    # -- I/O thread -------------------------------------------------------------------
    def tell(self, identity: bytes, address: str) -> None:
        """Frontend `identity` takes its replies at `address` from now on; "" forgets its route."""
        self._pending.put((identity, address))

    # -- inference thread -------------------------------------------------------------
    def apply(self) -> None:
        """Connects the routes told since the last call and closes the forgotten ones."""
        while True:
            try:
                identity, address = self._pending.get_nowait()
            except queue.Empty:
                return
            old = self._routes.pop(identity, None)
            if old is not None:
                if old[0] == address:
                    self._routes[identity] = old
                    continue
                old[1].close(linger=0)
            if not address:
                continue
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.SNDHWM, self._hwm)
            sock.setsockopt(zmq.SNDBUF, SNDBUF_BYTES)
            sock.setsockopt(zmq.LINGER, 1000)  # replies made while stopping still leave
            sock.setsockopt(zmq.RECONNECT_IVL, 50)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            try:
                sock.connect(address)
            except zmq.ZMQError as exc:
                log.warning("cannot connect to frontend %r's reply socket %s (%s); its replies go through the "
                            "I/O thread", identity, address, exc)
                sock.close(linger=0)
                continue
            self._routes[identity] = (address, sock)
            while len(self._routes) > MAX_ROUTES:
                self._routes.popitem(last=False)[1][1].close(linger=0)

    def send(self, identity: bytes, frames: list) -> bool:
        """Sends [worker name, *frames] to the frontend's reply socket; False where its route cannot take
        it now (none, not connected, full): the caller then sends it through the I/O thread."""
        if not self._pending.empty():
            self.apply()
        route = self._routes.get(identity)
        if route is None:
            return False
        try:
            route[1].send_multipart([self._sender, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:  # Again: not connected (yet) or full
            return False
        return True

    def __len__(self) -> int:
        return len(self._routes)

    def close(self) -> None:
        for _, sock in self._routes.values():
            sock.close()  # its linger: what was sent still leaves
        self._routes.clear()
