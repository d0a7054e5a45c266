"""`deep-detection client` end to end: the real command in a subprocess against a real server.

The server runs the null engine (instant, deterministic), so these tests cover
what the client does with files, depth pairing, pictures, COCO output, the
summary and its errors, not what a network predicts.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.serverproc import REPO, ServerProcess, free_port

RGBD = REPO / "test_imgs" / "rgbd"
RGB = REPO / "test_imgs" / "rgb"
FAIL_PIXEL = 7  # the null engine raises on images whose first pixel has this red value


@pytest.fixture(scope="module")
def null_server(tmp_path_factory: pytest.TempPathFactory):
    """Null models "rgbd" (the default) and "rgb"; "rgbd" fails on images marked with FAIL_PIXEL."""
    root = tmp_path_factory.mktemp("client-models")
    for name, kind, extra in (("rgbd", "RGBDNullServicer", {"fail_on_pixel": FAIL_PIXEL}),
                              ("rgb", "RGBNullServicer", {})):
        (root / name).mkdir()
        (root / name / "categories.txt").write_text("carton\nbag\n")
        (root / name / "node_config.json").write_text(json.dumps({
            "DETECTION_TYPE": kind, "CATEGORY_FILE": "categories.txt", "SCORE_THRESH_TEST": 0.0,
            "ENGINE_OPTIONS": {"instances": 4, **extra}}))
    srv = ServerProcess(root).start()
    try:
        srv.wait_serving()
        yield srv
    finally:
        srv.stop()


def client(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dd", "client", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def summary(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("summary: ")]
    assert len(lines) == 1, out
    return lines[0]


def png_size(path: Path) -> tuple[int, int]:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, f"{path} is not a readable image"
    assert img.ndim == 3 and img.shape[2] == 3
    return img.shape[1], img.shape[0]


def test_one_color_file_finds_its_depth(null_server: ServerProcess, tmp_path: Path) -> None:
    color = RGBD / "color" / "scene_900000.jpg"
    r = client(color, "--server", null_server.target, "--viz", tmp_path / "viz")
    assert r.returncode == 0, r.stderr
    line = summary(r.stdout)
    assert re.search(r"1 image, 4 instances, errors: 0; latency p50 [\d.]+ ms, p99 [\d.]+ ms; [\d.]+ images/s",
                     line), line
    assert len(re.findall(r"^(carton|bag) \d\.\d\d box \(", r.stdout, re.M)) == 4, r.stdout
    # Depth came from ../depth/scene_900000.png: the picture has the depth panel beside the color.
    assert png_size(tmp_path / "viz" / "scene_900000.png") == (1280, 480)


def test_depth_flag_for_a_file_elsewhere(null_server: ServerProcess, tmp_path: Path) -> None:
    color = tmp_path / "shot.jpg"
    color.write_bytes((RGBD / "color" / "scene_900001.jpg").read_bytes())
    r = client(color, "--server", null_server.target, "--viz", tmp_path / "viz")
    assert r.returncode == 2 and "--depth FILE" in r.stderr, r.stderr  # no ../depth/shot.png to find
    r = client(color, "--depth", RGBD / "depth" / "scene_900001.png", "--server", null_server.target,
               "--viz", tmp_path / "viz")
    assert r.returncode == 0, r.stderr
    assert png_size(tmp_path / "viz" / "shot.png") == (1280, 480)


def test_color_depth_folder_pictures_and_coco(null_server: ServerProcess, tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    names = sorted(p.name for p in (RGBD / "color").glob("*.jpg"))
    assert len(names) == 4
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps({
        "images": [{"id": 100 + i, "file_name": f"color/{n}", "width": 640, "height": 480}
                   for i, n in enumerate(names)],
        "annotations": [{"id": 1, "image_id": 100, "category_id": 1, "bbox": [10, 10, 50, 40], "area": 2000,
                         "iscrowd": 0, "segmentation": [[10, 10, 60, 10, 60, 50, 10, 50]]}],
        "categories": [{"id": 1, "name": "carton"}, {"id": 2, "name": "bag"}]}))
    out = tmp_path / "res.json"
    r = client(RGBD, "--server", null_server.target, "--viz", tmp_path / "viz", "--json", out,
               "--annotations", ann, "--concurrency", "3")
    assert r.returncode == 0, r.stderr
    assert "4 images, 16 instances, errors: 0" in summary(r.stdout)
    for n in names:
        assert png_size(tmp_path / "viz" / (Path(n).stem + ".png")) == (1280, 480)

    results = json.loads(out.read_text())
    assert len(results) == 16
    assert {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(results[0])
    assert results[0]["segmentation"]["size"] == [480, 640]
    dt = COCO(str(ann)).loadRes(str(out))
    assert sorted(dt.getImgIds()) == [100, 101, 102, 103]
    assert {a["image_id"] for a in dt.anns.values()} == {100, 101, 102, 103}
    assert all(a["area"] > 0 for a in dt.anns.values())
    assert not out.with_name("res.images.json").exists()  # ids came from the annotations


def test_json_without_annotations_writes_image_ids(null_server: ServerProcess, tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    out = tmp_path / "res.json"
    r = client(RGBD, "--server", null_server.target, "--json", out)
    assert r.returncode == 0, r.stderr
    side = out.with_name("res.images.json")
    images = json.loads(side.read_text())["images"]
    assert [(i["id"], i["file_name"]) for i in images] == [
        (k + 1, f"color/{n}") for k, n in enumerate(sorted(p.name for p in (RGBD / "color").glob("*.jpg")))]
    dt = COCO(str(side)).loadRes(str(out))  # the sidecar is a ground-truth skeleton
    assert len(dt.anns) == 16


def test_folder_of_color_images_rgb_model(null_server: ServerProcess, tmp_path: Path) -> None:
    r = client(RGB, "--server", null_server.target, "--model", "rgb", "--viz", tmp_path / "viz",
               "--score-threshold", "0.01")
    assert r.returncode == 0, r.stderr
    assert "2 images, 8 instances, errors: 0" in summary(r.stdout)
    pictures = sorted((tmp_path / "viz").iterdir())
    assert [p.name for p in pictures] == ["scene_900100.png", "scene_900101.png"]
    assert all(png_size(p) == (640, 480) for p in pictures)


def test_rgbd_model_names_the_images_without_depth(null_server: ServerProcess) -> None:
    r = client(RGB, "--server", null_server.target)
    assert r.returncode == 2
    assert "RGB-D" in r.stderr and "scene_900100.jpg" in r.stderr and "scene_900101.jpg" in r.stderr, r.stderr
    assert "--model (rgb)" in r.stderr, r.stderr  # and says which model would do
    assert "summary:" not in r.stdout  # nothing was sent


def test_failed_request_is_counted_by_status(null_server: ServerProcess, tmp_path: Path) -> None:
    for name, value in (("bad", FAIL_PIXEL), ("good", 120)):
        (tmp_path / "in" / "color").mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / "depth").mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / "in" / "color" / f"{name}.png"), np.full((96, 128, 3), value, np.uint8))
        cv2.imwrite(str(tmp_path / "in" / "depth" / f"{name}.png"), np.full((96, 128), 1500, np.uint16))
    # One at a time: the null engine fails the whole batch the marked image is in.
    r = client(tmp_path / "in", "--server", null_server.target, "--viz", tmp_path / "viz", "--concurrency", "1")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "2 images, 4 instances, errors: 1 (INTERNAL: 1)" in summary(r.stdout)
    assert "bad.png: INTERNAL" in r.stderr
    assert [p.name for p in (tmp_path / "viz").iterdir()] == ["good.png"]
    assert png_size(tmp_path / "viz" / "good.png") == (256, 96)


def test_missing_server_says_where_and_what_to_run(tmp_path: Path) -> None:
    target = f"127.0.0.1:{free_port()}"
    r = client(RGBD, "--server", target)
    assert r.returncode == 2
    assert target in r.stderr and "deep-detection serve" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def test_a_url_for_the_server_says_what_to_give_instead() -> None:
    r = client(RGBD, "--server", "https://detector.local:50051/")
    assert r.returncode == 2
    assert r.stderr.strip() == ("deep-detection client: --server takes HOST:PORT, not a URL: try --server "
                                "detector.local:50051 and --tls-ca for TLS"), r.stderr


def test_no_images_says_where_it_looked(null_server: ServerProcess, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    r = client(tmp_path / "empty", "--server", null_server.target)
    assert r.returncode == 2
    assert "no images found" in r.stderr and str(tmp_path / "empty") in r.stderr, r.stderr


@pytest.mark.slow
def test_torchvision_model_end_to_end(server: ServerProcess, tmp_path: Path) -> None:
    """The shared server's random-weight torchvision RGB-D model: real masks through pictures and COCO."""
    from pycocotools.coco import COCO

    out = tmp_path / "res.json"
    r = client(RGBD, "--server", server.target, "--model", "rgbd", "--viz", tmp_path / "viz", "--json", out)
    assert r.returncode == 0, r.stderr
    assert "4 images" in summary(r.stdout)
    assert len(list((tmp_path / "viz").glob("*.png"))) == 4
    results = json.loads(out.read_text())
    if results:  # random weights may find nothing above the threshold; then there is nothing to load
        COCO(str(out.with_name("res.images.json"))).loadRes(str(out))


def test_every_encoding_gets_the_same_answers(null_server: ServerProcess, tmp_path: Path) -> None:
    """The test images are JPEG + 16-bit PNG: raw (decoded here), jpeg+zstd (depth recompressed) and as-is
    (the server decodes both) hand the model the same pixels, so the answers must be equal."""
    answers = {}
    for encoding in ("auto", "raw", "jpeg+zstd", "jpeg+png", "as-is"):
        out = tmp_path / f"{encoding}.json"
        r = client(RGBD, "--server", null_server.target, "--json", out, "--encoding", encoding)
        assert r.returncode == 0, r.stderr
        assert "4 images, 16 instances, errors: 0" in summary(r.stdout)
        answers[encoding] = sorted((a["image_id"], a["bbox"], a["score"]) for a in json.loads(out.read_text()))
    assert all(a == answers["as-is"] for a in answers.values()), answers
    r = client(RGBD, "--server", null_server.target, "--encoding", "png")
    assert r.returncode == 2 and "invalid choice: 'png'" in r.stderr, r.stderr


def test_an_error_leaves_no_grpc_channel_for_exit_to_free() -> None:
    """The command's error path frees its gRPC asyncio channels before it returns.

    Left in the cycle an error inside asyncio.run makes, they were freed by the collector at
    interpreter exit, where gRPC joins a poller thread that can no longer run (grpc/grpc#22365): the
    process printed its error and then hung (about one run in twenty on grpcio 1.66, CI's lowest pin).
    The collector is off here so that only the command itself can free them.
    """
    import gc

    import grpc.aio

    from dd.cli import build_parser
    from dd.client.cli import run

    args = build_parser().parse_args(["client", str(RGBD), "--server", f"127.0.0.1:{free_port()}", "--timeout", "5"])

    def live_channels() -> int:
        return sum(isinstance(o, grpc.aio.Channel) for o in gc.get_objects())

    gc.collect()
    before = live_channels()
    gc.disable()
    try:
        assert run(args) == 2  # nobody listens: "cannot reach a deep-detection server"
        assert live_channels() == before
    finally:
        gc.enable()
