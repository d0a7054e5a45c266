"""The Python client: typed results from a deep-detection server, sync and asyncio."""

from dd.client.api import AsyncDetectorClient, DetectorClient, Instance, Result, make_request

__all__ = ["AsyncDetectorClient", "DetectorClient", "Instance", "Result", "make_request"]
