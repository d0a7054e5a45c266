"""Outputs written into a client's shared memory by the worker (KServe/Triton system shared memory).

The frontend checked the request's `shared_memory_region` output parameters against the
registration and sent the worker, per output, the segment's key and the absolute range
(ipc InferRequest.output_regions). The worker checks the segment again when it writes (the
client may have replaced or shrunk it since; it must still be the server user's own), refuses
an output larger than its range, and writes with pwrite: one copy, and no mapping that a
shrunk segment could turn into a SIGBUS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

from dd.ipc.client_segments import SegmentError, open_segment
from dd.worker.encoders import RequestError


@dataclass(frozen=True)
class OutputRange:
    output: str
    key: str
    offset: int  # in the segment
    byte_size: int


class OutputRegions:
    """One request's outputs that go into client shared memory (an encoder's OutputSink)."""

    def __init__(self, ranges: Iterable[OutputRange], uid: int | None = None) -> None:
        self.ranges = {r.output: r for r in ranges}
        self.uid = os.geteuid() if uid is None else uid

    @classmethod
    def from_request(cls, regions: Iterable[object]) -> "OutputRegions | None":
        """From ipc InferRequest.output_regions; None when the request has none."""
        ranges = [OutputRange(r.output, r.shm_key, int(r.offset), int(r.byte_size)) for r in regions]
        return cls(ranges) if ranges else None

    def __contains__(self, output: object) -> bool:
        return output in self.ranges

    def write(self, output: str, data: bytes) -> int:
        """Writes `data` at the start of the output's range; the bytes written."""
        r = self.ranges[output]
        if len(data) > r.byte_size:
            raise RequestError("INVALID_ARGUMENT", f"output {output!r} is {len(data)} bytes but its shared-memory "
                               f"range holds {r.byte_size}; give it a larger shared_memory_byte_size")
        try:
            fd, _ = open_segment(r.key, r.offset + r.byte_size, self.uid, writable=True)
        except SegmentError as exc:
            raise RequestError(exc.code, f"output {output!r}: {exc.message}") from None
        try:
            view, done = memoryview(data), 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], r.offset + done)
        finally:
            os.close(fd)
        return len(data)
