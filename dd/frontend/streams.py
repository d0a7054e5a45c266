"""A bidirectional stream of requests, served concurrently, for every protocol adapter.

Requests are served concurrently up to the stream's window; responses go out as they finish.
The window counts a request from when it is read until its response has been sent, so a client
that reads slowly holds at most a window of finished responses here; they count towards
max_pending, and in bytes towards max_held_response_mb, until sent (RequestPath.hold). The window
is at most half the ring, and slots go to the caller that holds the fewest (`owner`), so a stream
never takes every slot of its frontend. When the stream ends early (cancelled, deadline), its
requests still in flight are cancelled too, which gives their slots back, and the stream ends
quietly: nobody is left to tell.

Protocol-free: the adapter gives `answer` (a request -> its response bytes, an error response
for a failed request: it never raises) and `write` (sends one response on its call).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dd.frontend.requests import RequestPath

log = logging.getLogger("dd.frontend")


async def serve_stream(api: "RequestPath", requests: AsyncIterator[Any],
                       answer: Callable[[Any, object], Awaitable[bytes]],
                       write: Callable[[bytes], Awaitable[None]], what: str) -> None:
    """Serves `requests` until the client ends its side and every response is written.
    `what` names the call in debug lines (e.g. "DetectStream")."""
    window = asyncio.Semaphore(api.cfg.resolved_stream_window())
    done: asyncio.Queue = asyncio.Queue()
    tasks: set[asyncio.Task] = set()
    owner = object()  # this stream, for the slot pool's fair share
    end = object()
    pending = 0  # requests read whose response has not been written yet

    async def one(req: Any) -> None:
        body = await answer(req, owner)
        api.hold(body)  # until written
        done.put_nowait(body)  # its window place is given back once the response is written

    async def reader() -> None:
        nonlocal pending
        try:
            async for req in requests:
                await window.acquire()
                pending += 1
                task = asyncio.get_running_loop().create_task(one(req))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            done.put_nowait(end)

    def quiet_end(task: asyncio.Task) -> None:
        """A stream whose client went away ends its read with an error (ExecuteBatchError): nothing to
        report, and retrieved here so that asyncio does not log it with a traceback at ERROR."""
        if not task.cancelled() and task.exception() is not None:
            log.debug("%s read ended with %s", what, type(task.exception()).__name__)

    read_task = asyncio.create_task(reader())
    read_task.add_done_callback(quiet_end)
    try:
        ended = False
        while not (ended and pending == 0):
            item = await done.get()
            if item is end:
                ended = True
                continue
            pending -= 1
            try:
                await write(item)
            except Exception as exc:  # noqa: BLE001 - ExecuteBatchError and friends: the call has ended
                log.debug("%s ended while writing a response (%s)", what, type(exc).__name__)
                raise asyncio.CancelledError() from None
            finally:
                api.release(item)
            window.release()
    finally:
        read_task.cancel()
        for task in list(tasks):
            task.cancel()
        while not done.empty():  # finished responses nobody will read
            item = done.get_nowait()
            if item is not end:
                api.release(item)
