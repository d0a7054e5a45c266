"""The client's choice among its connections (dd.client.api._Connections): the fewest calls in flight, the
first of those, so that concurrent calls spread over a server's frontends, a busier one gets fewer, and
calls one at a time keep to one connection."""

from __future__ import annotations

import grpc
import pytest

from dd.client.api import _Connections


def _conns(n: int) -> _Connections:
    # Channels connect lazily: nothing listens at this address, and nothing needs to.
    return _Connections(grpc.insecure_channel, "localhost:1", None, [], n)


def test_calls_one_at_a_time_keep_to_the_first_connection() -> None:
    conns = _conns(3)
    picked = []
    for _ in range(4):
        i = conns.acquire()
        picked.append(i)
        conns.release(i)
    assert picked == [0, 0, 0, 0]


def test_a_call_goes_where_fewest_are_in_flight() -> None:
    conns = _conns(3)
    assert [conns.acquire() for _ in range(5)] == [0, 1, 2, 0, 1]
    assert conns.in_flight == [2, 2, 1]
    conns.release(1)  # connection 1's frontend answered
    conns.release(1)
    assert conns.acquire() == 1  # one fewer than 2, none at all on it
    assert conns.acquire() == 1
    assert conns.acquire() == 2
    assert conns.in_flight == [2, 2, 2]


def test_each_channel_has_a_connection_of_its_own() -> None:
    """gRPC shares one connection among channels with equal arguments unless each has its own pool."""
    seen = []
    _Connections(lambda target, opts: seen.append(opts) or grpc.insecure_channel(target, opts), "localhost:1", None,
                 [("grpc.max_send_message_length", 1)], 2)
    assert all(("grpc.use_local_subchannel_pool", 1) in opts for opts in seen) and len(seen) == 2


def test_at_least_one_connection() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        _conns(0)
