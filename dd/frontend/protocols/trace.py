"""A traced request's hops, for the gRPC adapters: asked for in the request's metadata, answered in the
trailing metadata.

Where a lone request's time goes between the client, the frontend's threads, the worker's I/O and
inference threads and back cannot be read from the response's Timing alone: the hand-offs between
processes and threads (each a wake-up of a sleeping thread) are in none of its fields. A client that
sends the metadata `dd-trace: 1` with a unary Detect or ModelInfer call gets, in the call's trailing
metadata under the same key, a JSON object of when (time.time() seconds, the server host's clock) the
request passed each hop: `handler` (the adapter's handler started, before the message had arrived
whole), dd.frontend.inputs.HOPS (the request path's and the worker's), and `returned` (the handler
gave the response to gRPC). A client on the same host compares them with its own clock
(dd.client.api.Result.trace; scripts/bench_serve.py's hop table). Streams are not traced.

Untraced requests pay one scan of their (few) metadata keys.
"""

from __future__ import annotations

import json
import time

import grpc

KEY = "dd-trace"


def wanted(context: grpc.aio.ServicerContext) -> bool:
    """The client asked for the trace (any value but "0" or empty)."""
    for key, value in context.invocation_metadata() or ():
        if key == KEY:
            return value not in ("", "0")
    return False


def answer(context: grpc.aio.ServicerContext, handler_at: float, stamps: dict[str, float] | None) -> None:
    """Puts the hops into the call's trailing metadata, `returned` stamped now."""
    trace = {"handler": handler_at, **(stamps or {}), "returned": time.time()}
    context.set_trailing_metadata(((KEY, json.dumps({k: round(v, 6) for k, v in trace.items()})),))
