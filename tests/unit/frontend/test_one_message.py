"""read_one: a unary call's one message from its request stream, under the upload deadline."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import pytest

from dd.frontend.errors import ServeError, Status
from dd.frontend.protocols.one_message import read_one


async def messages(*items: Any, then_stall: bool = False) -> AsyncIterator[Any]:
    for item in items:
        yield item
    if then_stall:  # a client that never sends the rest
        await asyncio.Event().wait()


def read(stream: AsyncIterator[Any], upload_timeout_s: float = 30.0, time_remaining: float | None = None) -> Any:
    return asyncio.run(read_one(stream, time_remaining, upload_timeout_s, "Detect", "DetectRequest", "DetectStream"))


def test_one_message_then_the_end_is_the_request() -> None:
    assert read(messages("req")) == "req"


def test_no_message_is_invalid() -> None:
    with pytest.raises(ServeError) as err:
        read(messages())
    assert err.value.status == Status.INVALID_ARGUMENT
    assert "carried no DetectRequest" in err.value.message


def test_two_messages_are_invalid_and_name_the_streaming_call() -> None:
    with pytest.raises(ServeError) as err:
        read(messages("a", "b"))
    assert err.value.status == Status.INVALID_ARGUMENT
    assert "Detect takes one DetectRequest; use DetectStream" in err.value.message


@pytest.mark.parametrize("sent", [(), ("req",)], ids=["no message", "no end of stream"])
def test_a_stalled_upload_is_given_up_at_the_upload_timeout(sent: tuple) -> None:
    with pytest.raises(ServeError) as err:
        read(messages(*sent, then_stall=True), upload_timeout_s=0.05)
    assert err.value.status == Status.DEADLINE_EXCEEDED
    assert "upload_timeout_s" in err.value.message


def test_the_calls_own_deadline_bounds_the_wait_when_sooner() -> None:
    with pytest.raises(ServeError) as err:
        read(messages(then_stall=True), upload_timeout_s=3600.0, time_remaining=0.05)
    assert err.value.status == Status.DEADLINE_EXCEEDED


def test_the_reads_run_in_the_callers_task() -> None:
    """Not each read in a task of its own (asyncio.wait_for on Python 3.11): that cost 1.8-3 ms per
    4.6 MB message. gRPC's request iterator is read from the handler's task, as a plain await would."""
    seen: list[asyncio.Task | None] = []

    async def recording() -> AsyncIterator[str]:
        seen.append(asyncio.current_task())
        yield "req"
        seen.append(asyncio.current_task())

    async def main() -> asyncio.Task | None:
        await read_one(recording(), None, 30.0, "Detect", "DetectRequest", "DetectStream")
        return asyncio.current_task()

    if not hasattr(asyncio, "timeout"):
        pytest.skip("Python 3.10 has no asyncio.timeout: one wait_for task around both reads")
    caller = asyncio.run(main())
    assert seen == [caller, caller]


def test_without_asyncio_timeout_one_wait_for_does_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Python 3.10 path."""
    monkeypatch.delattr(asyncio, "timeout", raising=False)
    assert read(messages("req")) == "req"
    with pytest.raises(ServeError) as err:
        read(messages("req", then_stall=True), upload_timeout_s=0.05)
    assert err.value.status == Status.DEADLINE_EXCEEDED
    with pytest.raises(ServeError) as err:
        read(messages("a", "b"))
    assert err.value.status == Status.INVALID_ARGUMENT
