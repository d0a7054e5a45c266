"""The Python client: typed results from a deep-detection server, sync and asyncio.

Names are imported on first use, so that `deep-detection worker` (which builds
the same command-line parser) never imports gRPC: an engine process has no use for it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AsyncDetectorClient", "DetectionError", "DetectorClient", "Instance", "Result", "make_request"]


def __getattr__(name: str) -> Any:
    if name == "DetectionError":
        from dd.client.errors import DetectionError

        return DetectionError
    if name in __all__:
        from dd.client import api

        return getattr(api, name)
    raise AttributeError(f"module 'dd.client' has no attribute {name!r}")
