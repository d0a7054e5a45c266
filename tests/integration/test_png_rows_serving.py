"""16-bit PNG depths sent to the worker as their filtered rows (issue #18): a real server, real rings.

One server holds three RGB-D models: `rows` (an engine that reconstructs rows itself, with the torch
function the fast engine runs on its GPU, here on the CPU), `pixels` (the same engine without the
declaration) and `null`. Every answer must be the same whichever path the depth took; the probe
engines (tests/png_rows_probe_engine.py) record what each image's depth was when it reached them,
so the comparison cannot pass by every depth going as pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import cv2
import grpc
import numpy as np
import pytest

from dd.ipc import messages
from dd.ipc.shm_ring import SHM_DIR, RingError, ShmRing, segment_name
from dd.png_rows import PngRows
from dd.proto.deep_detection.v1 import detector_pb2 as pb
from dd.proto.deep_detection.v1 import detector_pb2_grpc as pb_grpc
from dd.synth.scenes import generate_scene
from tests.jpeg_samples import jpeg
from tests.png_writer import PAETH, SUB, UP, png16, random_filters
from dd.worker.server import _depth
from tests.faults import write_model_folders
from tests.serverproc import ServerProcess

H, W = 90, 120


def _repo(root: Path) -> Path:
    engines = {"rows": "tests.png_rows_probe_engine:RowsProbe", "pixels": "tests.png_rows_probe_engine:PixelsProbe"}
    models = {name: {"DETECTION_TYPE": "RGBDPngRowsProbe", "ENGINE": engine,
                     "ENGINE_OPTIONS": {"record": str(root / f"{name}.log"), "instances": 9}}
              for name, engine in engines.items()}
    return write_model_folders(root, {**models, "null": {"DETECTION_TYPE": "RGBDNullServicer", "ENGINE_OPTIONS": {"instances": 9}}})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    repo = _repo(tmp_path_factory.mktemp("pngrows") / "models")
    srv = ServerProcess(repo).start()
    try:
        srv.wait_workers_ready({"rows": 1, "pixels": 1, "null": 1})
        yield srv, repo
    finally:
        srv.stop()


def _depths() -> dict[str, tuple[bytes, bool]]:
    """name -> (a depth PNG, whether its rows may go as rows)."""
    rng = np.random.default_rng(0)
    out = {}
    for seed in range(3):
        d = generate_scene(seed, W, H).depth
        ok, buf = cv2.imencode(".png", d)  # a user's cv2.imwrite: every row Sub
        out[f"opencv{seed}"] = (buf.tobytes(), True)
        out[f"mixed{seed}"] = (png16(d, random_filters(rng, H)), True)
    noise = rng.integers(0, 65536, (H, W)).astype(np.uint16)
    out["noise-up"] = (png16(noise, [UP] * H), True)
    paeth = [SUB] * H
    paeth[40] = PAETH
    out["one-paeth-row"] = (png16(generate_scene(9, W, H).depth, paeth), False)
    return out


def _instances(srv: ServerProcess, model: str, color: bytes, depth: bytes) -> list[bytes]:
    with grpc.insecure_channel(srv.target) as ch:
        resp = pb_grpc.DetectorStub(ch).Detect(pb.DetectRequest(model=model, color=pb.Image(data=color),
                                                                depth=pb.Image(data=depth)), timeout=60)
    assert (resp.height, resp.width) == (H, W) and len(resp.instances) == 9
    return [i.SerializeToString() for i in resp.instances]


def test_rows_answer_as_pixels_do_and_went_as_rows(server) -> None:
    srv, repo = server
    color = jpeg(generate_scene(1, W, H).color, quality=85)
    for log in ("rows", "pixels"):
        (repo / f"{log}.log").unlink(missing_ok=True)
    depths = _depths()
    for name, (depth, _) in depths.items():
        answers = {m: _instances(srv, m, color, depth) for m in ("rows", "pixels", "null")}
        assert answers["rows"] == answers["pixels"] == answers["null"], name
    # The engine that declares it got the rows of every PNG whose rows are None, Sub or Up; the one that
    # does not got pixels throughout (the frontend decoded them).
    assert (repo / "rows.log").read_text().split() == ["rows" if sent else "pixels" for _, sent in depths.values()]
    assert set((repo / "pixels.log").read_text().split()) == {"pixels"}


def test_a_broken_png_is_refused_on_both_paths(server) -> None:
    srv, _ = server
    color = jpeg(generate_scene(2, W, H).color)
    good = png16(generate_scene(2, W, H).depth, [SUB] * H)
    bad = bytearray(good)
    bad[good.index(b"IDAT") + 20] ^= 0xFF
    for model in ("rows", "pixels"):
        with pytest.raises(grpc.RpcError) as err:
            _instances(srv, model, color, bytes(bad))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, model
        assert err.value.details().startswith("depth: "), err.value.details()


def test_the_worker_reads_rows_in_place_and_checks_their_reference() -> None:
    name = segment_name("feedc0ffe2", "fe")
    (SHM_DIR / name).unlink(missing_ok=True)
    ring = ShmRing.create(name, slots=2, slot_bytes=10_000)
    try:
        ring.slot_buffer(1)[64:64 + 4 * 9] = bytes(range(36))
        rows = _depth(ring, 1, messages.ArrayRef(offset=64, shape=[4, 4], dtype="uint16", encoding="png_rows",
                                                 nbytes=36))
        assert isinstance(rows, PngRows) and rows.data.shape == (4, 9) and rows.data.tobytes() == bytes(range(36))
        ring.slot_buffer(1)[64] = 2  # a view of the slot, not a copy
        assert rows.data[0, 0] == 2
        del rows
        with pytest.raises(ValueError, match="are 36 bytes, not 35"):
            _depth(ring, 1, messages.ArrayRef(shape=[4, 4], dtype="uint16", encoding="png_rows", nbytes=35))
        with pytest.raises(ValueError, match="reconstruct to"):
            _depth(ring, 1, messages.ArrayRef(shape=[4, 4], dtype="float32", encoding="png_rows", nbytes=36))
        with pytest.raises(RingError):  # past the slot's end
            _depth(ring, 1, messages.ArrayRef(offset=ring.slot_bytes - 20, shape=[4, 4], dtype="uint16", encoding="png_rows",
                                              nbytes=36))
        with pytest.raises(ValueError, match="not known"):
            _depth(ring, 1, messages.ArrayRef(shape=[4, 4], dtype="uint16", encoding="jpeg", nbytes=36))
        plain = _depth(ring, 1, messages.ArrayRef(offset=64, shape=[4, 4], dtype="uint16"))
        assert isinstance(plain, np.ndarray) and plain.shape == (4, 4)
        del plain
    finally:
        ring.close()
        ring.unlink()
