"""Each frontend names its input ring in its pings; the worker maps it and has its engine prepare it
(the fast engine page-locks it) before the first image read from it. Before, the first batch of every
frontend paid the page-locking (on the H200, the first requests after SERVING waited ~0.4 s).

A real server with two frontends and a probe engine (tests/prepare_probe_engine.py) that records, in
order, the mappings it was asked to prepare and the mapping each image it inferred lies in."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import grpc
import numpy as np

from dd.proto.deep_detection.v1 import detector_pb2 as pb
from dd.proto.deep_detection.v1 import detector_pb2_grpc as pb_grpc
from tests.serverproc import ServerProcess

FRONTENDS = 2


def _model(root: Path) -> Path:
    folder = root / "probe"
    folder.mkdir(parents=True)
    (folder / "categories.txt").write_text("a\n")
    (folder / "node_config.json").write_text(json.dumps({
        "DETECTION_TYPE": "RGBPrepareProbe", "ENGINE": "tests.prepare_probe_engine:PrepareProbe",
        "CATEGORY_FILE": "categories.txt", "SCORE_THRESH_TEST": 0.0,
        "ENGINE_OPTIONS": {"record": str(root / "probe.log")}}))
    return folder


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_every_frontends_ring_is_prepared_before_its_first_image(tmp_path: Path) -> None:
    record = tmp_path / "probe.log"
    with ServerProcess(_model(tmp_path), frontends=FRONTENDS) as srv:
        # Each frontend pings the worker on its own schedule; both rings are named within a few pings.
        end = time.monotonic() + 60
        while len({ln for ln in _lines(record) if ln.startswith("prepare ")}) < FRONTENDS:
            assert time.monotonic() < end, f"rings prepared: {_lines(record)}\n{srv.log()}"
            time.sleep(0.1)
        assert not any(ln.startswith("infer ") for ln in _lines(record))  # prepared before any request
        img = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.DetectorStub(ch)
            for _ in range(8):
                stub.Detect(pb.DetectRequest(model="probe", color=pb.Image(
                    encoding=pb.Image.RAW, shape=[48, 64, 3], dtype=pb.UINT8, data=img.tobytes())), timeout=60)
        log = srv.log()
    # the worker says how many rings it prepared and in how long (a step of start-up: bench_startup's phases)
    logged = re.findall(r"worker \S+ prepared (\d+) frontend ring\(s\) for its engine in [\d.]+ s", log)
    assert sum(int(n) for n in logged) == FRONTENDS, log
    lines = _lines(record)
    prepared: set[str] = set()
    inferred = 0
    for ln in lines:
        kind, mapping = ln.split()
        if kind == "prepare":
            prepared.add(mapping)
        else:
            inferred += 1
            assert mapping in prepared, f"an image read from a ring not prepared before it: {lines}"
    assert inferred == 8 and len(prepared) == FRONTENDS
