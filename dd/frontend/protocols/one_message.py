"""Reading a unary call's one message from a request stream, with an upload deadline.

Detect and ModelInfer are served as client streams of one message, so that the handler runs (and
its clock starts) before the message has arrived and a message that never finishes arriving is
given up after upload_timeout_s. The end of the stream is read too: a call whose handler ends before
gRPC has seen it keeps the received message in memory after the call is over (23 MB a call, measured).

Both reads run in one task under one deadline: the handler's own, with asyncio.timeout (Python 3.10:
one wait_for around both). Not asyncio.wait_for around each read, which runs each in a task of its own:
with a 4.6 MB message on the CPU box a bare grpc.aio server answered in 4.7-4.9 ms with plain reads or
either of these, and in 7.4-8.4 ms with a wait_for per read (BENCHMARKS.md, "Where a request's time
goes at concurrency 1").
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from dd.frontend.errors import ServeError, Status


async def read_one(requests: AsyncIterator[Any], time_remaining: float | None, upload_timeout_s: float,
                   rpc: str, message: str, streaming_rpc: str) -> Any:
    """The call's one message, then the end of its stream (a unary client sends both at once).

    INVALID_ARGUMENT when the call carries no message or more than one (`rpc` takes one `message`;
    `streaming_rpc` takes several); DEADLINE_EXCEEDED if it has not all arrived within
    upload_timeout_s (or the call's own deadline, if sooner)."""
    wait = upload_timeout_s if time_remaining is None else min(upload_timeout_s, time_remaining)
    try:
        request = await _both(requests, wait)
    except StopAsyncIteration:
        raise ServeError(Status.INVALID_ARGUMENT, f"the call carried no {message}") from None
    except (asyncio.TimeoutError, TimeoutError):
        raise ServeError(Status.DEADLINE_EXCEEDED,
                         f"the request message did not arrive within {wait:.0f} s of the call's start "
                         "(upload_timeout_s); send smaller images or ask the operator to raise "
                         "--upload-timeout") from None
    if request is _MORE:
        raise ServeError(Status.INVALID_ARGUMENT, f"{rpc} takes one {message}; use {streaming_rpc} for several")
    return request


_MORE = object()  # a second message came instead of the end of the stream


async def _reads(requests: AsyncIterator[Any]) -> Any:
    request = await requests.__anext__()
    try:
        await requests.__anext__()
    except StopAsyncIteration:
        return request
    return _MORE


async def _both(requests: AsyncIterator[Any], wait: float) -> Any:
    timeout = getattr(asyncio, "timeout", None)
    if timeout is None:  # Python 3.10 has no asyncio.timeout: one wait_for around both reads (one task, not two)
        return await asyncio.wait_for(_reads(requests), timeout=wait)
    async with timeout(wait):
        return await _reads(requests)
