"""A worker serializes responses of up to ~1 MB (100 masks as COCO RLE) per image. With glibc's
default allocator thresholds each serialization got fresh memory mappings and paid a page fault per
4 KiB touched: 0.8 of a 0.9 ms encode on the CPU box. The worker process sets the thresholds the
frontends use (dd.procutil.return_large_allocations) before anything else.

Counted in page faults, not time, so a busy machine changes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dd.config import ServerConfig, load_model_config
from dd.worker import server as worker_server

_CHILD = r"""
import json, resource, sys
if sys.argv[1] == "tuned":
    from dd.procutil import return_large_allocations
    assert return_large_allocations()
from dd.proto.deep_detection.v1 import detector_pb2 as pb
resp = pb.DetectResponse()
for i in range(100):
    resp.instances.add().mask.counts = bytes([48 + i % 64]) * 6700   # a 670 KB response, like R50's
for _ in range(5):
    resp.SerializeToString()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    resp.SerializeToString()
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50))
"""


def _faults_per_serialization(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[3])
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_responses_are_serialized_without_page_faults_once_tuned() -> None:
    default, tuned = _faults_per_serialization("default"), _faults_per_serialization("tuned")
    assert tuned < 20, f"{tuned} page faults per 670 KB serialization with the worker's allocator settings"
    assert default > 5 * max(tuned, 1), (default, tuned)  # what the settings are for (glibc's defaults)


class _Called(Exception):
    pass


def test_the_worker_process_tunes_its_allocator_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "categories.txt").write_text("a\n")
    (tmp_path / "node_config.json").write_text(json.dumps({"DETECTION_TYPE": "RGBNullServicer",
                                                           "CATEGORY_FILE": "categories.txt"}))
    worker = worker_server.Worker(load_model_config(tmp_path), ServerConfig(), 0, tmp_path, "cpu")

    def called() -> bool:
        raise _Called

    monkeypatch.setattr(worker_server, "return_large_allocations", called)
    try:
        with pytest.raises(_Called):
            worker.run()
    finally:
        worker.ctx.term()
