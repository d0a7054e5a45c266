"""The one error a request fails with below the protocol adapters, carrying a status of our own.

Decoding, admission and dispatch raise ServeError(Status.X, message); each protocol
adapter (dd/frontend/protocols/) maps Status to its own codes (gRPC status codes for
detector_v1). The names are gRPC's canonical ones, which the workers' replies use too.
"""

from __future__ import annotations

import enum


class Status(str, enum.Enum):
    OK = "OK"
    CANCELLED = "CANCELLED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"
    UNIMPLEMENTED = "UNIMPLEMENTED"  # a call this server has but does not serve as configured
    ALREADY_EXISTS = "ALREADY_EXISTS"  # a client shared-memory region registered twice under one name
    PERMISSION_DENIED = "PERMISSION_DENIED"  # a shared-memory segment of another user

    @classmethod
    def from_name(cls, name: str) -> "Status":
        """A worker reply's code; INTERNAL for a name this frontend does not know."""
        try:
            return cls(name)
        except ValueError:
            return cls.INTERNAL


class ServeError(Exception):
    """A request refused or failed: `status` says how, `message` tells the client what to do."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
