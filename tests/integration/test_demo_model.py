"""The shipped demo models: quality through a real server, and the one-core CPU latency bound.

Why these tests exist: the README promises a new user a demo model that finds cartons and runs on a
laptop CPU. Quality is checked the way users meet it (a real `deep-detection serve`, JPEG/PNG files,
pycocotools) on held-out scenes, with a floor well under the published numbers so that only a real
regression (wrong normalisation, stale weights, broken mask encoding) trips it. They fail on the
placeholder random weights by design, until trained weights land (scripts/train_demo.py).
"""

from __future__ import annotations

import importlib.util
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from tests.serverproc import ServerProcess

REPO = Path(__file__).resolve().parents[2]
#: DD_DEMO_MODELS checks freshly trained folders before they replace the shipped ones.
MODELS = Path(os.environ.get("DD_DEMO_MODELS", REPO / "configs" / "models"))
#: Mask AP50 floors on SCENES held-out scenes; the issue asks for >= 0.90 on 200 (RGB-D), so these
#: leave room for the noise of a small sample, not for a worse model.
FLOORS = {"demo-rgbd": 0.80, "demo-rgb": 0.60}
#: Mask precision (IoU >= 0.5) at each model's own SCORE_THRESH_TEST on the same scenes. Measured:
#: demo-rgb 0.979 at 0.8 (0.903 at 0.5) on 200 scenes; demo-rgbd 0.915 at 0.5 on 100 (seeds 11000000+).
PRECISION_FLOORS = {"demo-rgbd": 0.85, "demo-rgb": 0.95}
SCENES = 20
EVAL_SEED = 10_000_000  # held out: training seeds stay below
LATENCY_BOUND_MS = 150.0
LATENCY_MARGIN = 2.0  # shared CI cores are noisy; the bound itself is checked by train_demo.py's report
PRESENT = [name for name in FLOORS if (MODELS / name / "node_config.json").is_file()]


def _eval_demo() -> ModuleType:
    """scripts/ is not a package; load the evaluator the published numbers come from, not a copy."""
    spec = importlib.util.spec_from_file_location("eval_demo", REPO / "scripts" / "eval_demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("eval_demo", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_server() -> Iterator[ServerProcess]:
    """One server for every shipped demo model: the built-in repository, as `serve` with no arguments."""
    with ServerProcess(MODELS, frontends=1) as srv:
        yield srv


@pytest.mark.parametrize("name", PRESENT)
def test_demo_model_weights_are_small(name: str) -> None:
    weights = MODELS / name / "model.pth"
    assert weights.stat().st_size <= 15 * 1000 * 1000, f"{weights}: {weights.stat().st_size / 1e6:.1f} MB > 15 MB"


@pytest.mark.parametrize("name", PRESENT)
def test_demo_model_mask_ap50_through_server(demo_server: ServerProcess, name: str) -> None:
    from dd.config import load_model_config

    threshold = load_model_config(MODELS / name).score_threshold
    result: dict[str, Any] = _eval_demo().evaluate(demo_server.target, name, count=SCENES, seed=EVAL_SEED,
                                                   send="files", concurrency=2, at=(threshold,))
    assert result["model"] == name
    summary = ", ".join(f"{k} {result[k]:.3f}" for k in ("mask_AP", "mask_AP50", "mask_AP75", "box_AP", "box_AP50"))
    assert result["mask_AP50"] >= FLOORS[name], (
        f"{name}: mask AP50 {result['mask_AP50']:.3f} < {FLOORS[name]} on {SCENES} held-out scenes ({summary}); "
        "placeholder weights fail this by design: train with scripts/train_demo.py")
    # What a user gets at the model's own threshold: few false pieces. (demo-rgb at 0.5 had 0.90.)
    op = result["operating_points"][0]
    assert op["precision"] >= PRECISION_FLOORS[name], (
        f"{name}: mask precision {op['precision']:.3f} < {PRECISION_FLOORS[name]} at its SCORE_THRESH_TEST "
        f"{threshold} on {SCENES} held-out scenes ({op}): too many false detections for its threshold")


def test_each_cpu_worker_runs_as_many_torch_threads_as_it_has_cores(demo_server: ServerProcess) -> None:
    """The workers are forked from the zygote with torch imported: the pool torch sized there must be
    resized to the cores each is pinned to (two threads spinning on one core made every demo request
    9x slower). Read from the workers' own report of what torch runs with."""
    from dd.procutil import parse_cpulist

    demo_server.wait_workers_ready({name: 1 for name in PRESENT})
    found = re.findall(r"\[worker-([\w.-]+)\] worker pid \d+ on cores ([\d,-]+) with (\d+) CPU thread",
                       demo_server.log())
    assert sorted(w for w, _, _ in found) == sorted(f"{name}.0" for name in PRESENT), demo_server.log()[-3000:]
    for worker, cores, threads in found:
        assert int(threads) == len(parse_cpulist(cores)), (worker, cores, threads)


def readme_python() -> str:
    """The README's Python example: its one ```python block that talks to a server."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    found = [b for b in blocks if "DetectorClient(" in b and "localhost:50051" in b]
    assert len(found) == 1, f"expected one client example in README.md, found {len(found)}"
    return found[0]


@pytest.mark.skipif("demo-rgbd" not in PRESENT, reason="the README's example uses the RGB-D demo model")
def test_readme_python_example_runs_as_written(demo_server: ServerProcess) -> None:
    """The example, run from the repository root against `deep-detection serve` with no arguments;
    only the address changes (the test server has a port of its own)."""
    code = readme_python().replace("localhost:50051", demo_server.target)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines and all(line.startswith("carton ") for line in lines), res.stdout
    assert all(int(line.split()[-1]) > 0 for line in lines), res.stdout  # mask pixels


def test_readme_python_example_says_why_without_a_server(tmp_path: Path) -> None:
    """With no server at the address, it ends with one line: the status and gRPC's reason."""
    from tests.serverproc import free_port

    code = readme_python().replace("localhost:50051", f"127.0.0.1:{free_port()}")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.startswith("UNAVAILABLE: "), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr


@pytest.mark.parametrize("name", PRESENT)
def test_demo_model_cpu_latency_one_core(name: str) -> None:
    """In-process reference engine, one thread, 640x480 held-out scenes at the model's own threshold.

    Measured in CPU time of this process, not wall time: the claim is what one core's work costs,
    and on a shared machine wall time also counts whatever else ran on that core meanwhile."""
    from dd.config import load_model_config
    from dd.synth.scenes import generate_scene
    from dd.worker.engines.base import EngineInput
    from dd.worker.engines.torchvision_maskrcnn import TorchvisionMaskRCNN

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_model_config(MODELS / name)
        engine = TorchvisionMaskRCNN(cfg, "cpu")
        engine.load()
        scenes = [generate_scene(EVAL_SEED + k, 640, 480) for k in range(3)]
        inputs = [EngineInput(s.color, s.depth if cfg.input_kind == "rgbd" else None, cfg.score_threshold)
                  for s in scenes]
        engine.infer([inputs[0]])
        times = []
        for k in range(5):
            t = time.process_time()
            engine.infer([inputs[k % len(inputs)]])
            times.append((time.process_time() - t) * 1000.0)
        engine.close()
    finally:
        torch.set_num_threads(threads)
    median = statistics.median(times)
    assert median <= LATENCY_BOUND_MS * LATENCY_MARGIN, (
        f"{name}: {median:.0f} ms CPU time median per 640x480 image on one core (runs {np.round(times).tolist()}); "
        f"bound {LATENCY_BOUND_MS:.0f} ms x {LATENCY_MARGIN} margin")


def test_operating_point_counts_false_pieces_and_misses() -> None:
    """scripts/eval_demo.py --at: precision/recall at a score threshold, the numbers a served threshold
    is chosen by. One carton found, one piece that overlaps nothing, one carton found only below 0.5."""
    from pycocotools import mask as mask_util

    def rle(y: int, x: int, size: int) -> dict:
        m = np.zeros((20, 20), np.uint8)
        m[y:y + size, x:x + size] = 1
        return mask_util.encode(np.asfortranarray(m))

    gts = [rle(2, 2, 8), rle(12, 12, 6)]
    dts = [(0.9, rle(2, 2, 8)), (0.8, rle(0, 15, 3)), (0.3, rle(12, 12, 6))]
    at = _eval_demo().operating_point
    assert at([gts], [dts], 0.5) == {"score_threshold": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5,
                                     "false_positives": 1, "missed": 1}
    low = at([gts], [dts], 0.2)
    assert (low["false_positives"], low["missed"], low["recall"]) == (1, 0, 1.0)
