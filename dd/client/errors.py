"""The client library's one exception: a request the server could not or would not serve.

Why its own type: a caller should not have to know gRPC's internals
(`grpc._channel._InactiveRpcError`) to tell "no server there" from "no such
model" from "bad image". Why still a `grpc.RpcError`: code written against the
raw stub (`except grpc.RpcError as e: e.code(), e.details()`) keeps working
unchanged; `code()` and `details()` are the same methods gRPC's errors have.
"""

from __future__ import annotations

import grpc


class DetectionError(grpc.RpcError, RuntimeError):
    """A call to a deep-detection server failed.

    code():    the gRPC status (grpc.StatusCode): UNAVAILABLE when no server answers
               at the address (or the model cannot be served now), NOT_FOUND for an
               unknown model, INVALID_ARGUMENT for a bad image, RESOURCE_EXHAUSTED
               when the server is overloaded, DEADLINE_EXCEEDED, UNAUTHENTICATED, ...
    details(): the server's message (why, and often what to do), or gRPC's own
               where no server answered.
    model:     the model the request named ("" = the server's default; "" for ListModels).
    target:    the server address the client talked to.
    str(err):  one line with all of the above.
    """

    def __init__(self, code: grpc.StatusCode, details: str, *, model: str = "", target: str = "") -> None:
        self._code = code
        self._details = details
        self.model = model
        self.target = target
        super().__init__(self._line())

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def _line(self) -> str:
        where = f"server {self.target}" if self.target else "server"
        if self._code == grpc.StatusCode.UNAVAILABLE and _no_server(self._details):
            return (f"cannot reach a deep-detection {where} ({self._code.name}: {self._details}); "
                    "is `deep-detection serve` running there?")
        what = f"model {self.model!r}" if self.model else "request"
        return f"{where} refused the {what}: {self._code.name}: {self._details}"

    def __reduce__(self) -> tuple:
        """Pickles whole (for a ProcessPoolExecutor of clients): the default would call __init__ with str(self)."""
        return _rebuild, (self._code, self._details, self.model, self.target)

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError, *, model: str = "", target: str = "") -> "DetectionError":
        """Wraps a raw gRPC error (sync or asyncio) raised by a stub call."""
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return cls(code or grpc.StatusCode.UNKNOWN, (details or "").strip(), model=model, target=target)


def _rebuild(code: grpc.StatusCode, details: str, model: str, target: str) -> DetectionError:
    return DetectionError(code, details, model=model, target=target)


def _no_server(details: str) -> bool:
    """gRPC's own words for "nothing answered" (connection refused, DNS, TLS handshake), not a server's."""
    text = details.lower()
    return any(s in text for s in ("failed to connect", "connection refused", "dns resolution", "unreachable",
                                   "handshake", "connections to all backends failing", "socket closed"))
