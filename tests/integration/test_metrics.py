"""dd.metrics: what several real processes record is what one scrape of the endpoint shows.

Each recording process is a fresh interpreter (multiprocessing's spawn), as the
supervisor's children are; the endpoint runs in the test process on a free
loopback port and is read over HTTP and parsed with prometheus_client's parser.
"""

from __future__ import annotations

import multiprocessing
import os
import stat
import subprocess
import sys
import urllib.request
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dd import metrics
from dd.metrics import GpuCollector, Recorder

REPO = Path(__file__).resolve().parents[2]

# What each process does: (Recorder method, args). Frontends answer requests,
# workers run batches, the supervisor counts a restart.
FRONTEND_A = [("record_request", ("rgbd", True, 1000, 100, 10, 500, 50)),
              ("record_request", ("rgbd", True, 2000, 300, 20, 700, 60)),
              ("record_request", ("rgbd", True, 30000, 9000, 30, 900, 70)),
              ("record_request", ("rgbd", False, 0, 0, 0, 0, 0, "RESOURCE_EXHAUSTED")),
              ("record_request", ("rgbd", False, 0, 0, 0, 0, 0, "INVALID_ARGUMENT")),
              ("record_request", ("rgbd", False, 0, 0, 0, 0, 0, "INVALID_ARGUMENT")),
              ("record_decode", ("rgbd", 700)), ("record_decode", ("rgbd", 4000))]
FRONTEND_B = [("record_request", ("rgb", True, 4000, 1000, 5, 2500, 40)),
              ("record_request", ("rgb", True, 6000, 1500, 5, 2600, 45)),
              ("record_request", ("rgbd", True, 8000, 2000, 10, 3000, 50)),
              ("record_request", ("rgb", False, 0, 0, 0, 0, 0, "DEADLINE_EXCEEDED")),
              ("record_decode", ("rgb", 300))]
WORKER_RGBD = [("record_batch", ("rgbd", 3)), ("record_batch", ("rgbd", 1))]
WORKER_RGB = [("record_batch", ("rgb", 2)), ("record_batch", ("rgb", 1)), ("record_batch", ("rgb", 1))]
SUPERVISOR = [("worker_restarted", ("rgbd",))]
PROCESSES = [FRONTEND_A, FRONTEND_B, WORKER_RGBD, WORKER_RGB, SUPERVISOR]
# A worker started on its own (no PROMETHEUS_MULTIPROC_DIR): must not count.
STANDALONE = [("record_batch", ("rgbd", 8))] * 5 + [("record_request", ("rgbd", True, 1, 1, 1, 1, 1))] * 5


def record(calls: list[tuple[str, tuple]], standalone: bool = False) -> None:
    if standalone:
        os.environ.pop(metrics.MULTIPROC_ENV, None)
    recorder = Recorder()
    assert recorder.enabled is not standalone
    for method, args in calls:
        getattr(recorder, method)(*args)


def hold_ring(in_use: int, capacity: int, ready: Any, release: Any) -> None:
    Recorder().set_ring_slots(in_use, capacity)
    ready.set()
    release.wait(60)


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def expected(processes: list[list[tuple[str, tuple]]]) -> dict[tuple[str, frozenset], float]:
    """The totals the calls must add up to, computed from the calls."""
    out: dict[tuple[str, frozenset], float] = defaultdict(float)

    def key(name: str, **labels: str) -> tuple[str, frozenset]:
        return name, frozenset(labels.items())

    for calls in processes:
        for method, args in calls:
            if method == "record_request":
                model, ok, total, queue, inp, infer, outp, *status = args
                if not ok:
                    out[key(metrics.REQUEST_FAILURE, model=model, version="1",
                            reason=metrics.failure_reason(status[0]))] += 1
                    continue
                out[key(metrics.REQUEST_SUCCESS, model=model, version="1")] += 1
                for name, value in ((metrics.REQUEST_DURATION_US, total), (metrics.QUEUE_DURATION_US, queue),
                                    (metrics.COMPUTE_INPUT_DURATION_US, inp),
                                    (metrics.COMPUTE_INFER_DURATION_US, infer),
                                    (metrics.COMPUTE_OUTPUT_DURATION_US, outp)):
                    out[key(name, model=model, version="1")] += value
                for name, value in ((metrics.REQUEST_SECONDS, total), (metrics.QUEUE_SECONDS, queue),
                                    (metrics.COMPUTE_INFER_SECONDS, infer)):
                    out[key(name + "_count", model=model, version="1")] += 1
                    out[key(name + "_sum", model=model, version="1")] += value / 1e6
            elif method == "record_batch":
                model, size = args
                out[key(metrics.EXEC_COUNT, model=model, version="1")] += 1
                out[key(metrics.INFERENCE_COUNT, model=model, version="1")] += size
                out[key(metrics.BATCH_SIZE + "_count", model=model, version="1")] += 1
                out[key(metrics.BATCH_SIZE + "_sum", model=model, version="1")] += size
                for bound in metrics.BATCH_BUCKETS:
                    if size <= bound:
                        out[key(metrics.BATCH_SIZE + "_bucket", model=model, version="1", le=f"{float(bound)}")] += 1
            elif method == "record_decode":
                model, us = args
                out[key(metrics.DECODE_SECONDS + "_count", model=model, version="1")] += 1
                out[key(metrics.DECODE_SECONDS + "_sum", model=model, version="1")] += us / 1e6
            elif method == "worker_restarted":
                out[key(metrics.WORKER_RESTARTS, model=args[0])] += 1
    return dict(out)


@pytest.fixture()
def multiproc_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(metrics.MULTIPROC_ENV, "")  # restored after the test; prepare sets it
    return metrics.prepare_multiproc_dir(tmp_path / "run" / "metrics")


def run_all(processes: list[tuple[Any, tuple]]) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=args) for target, args in processes]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0


def test_counts_of_several_processes_add_up_exactly(multiproc_dir: Path) -> None:
    run_all([(record, (calls,)) for calls in PROCESSES] + [(record, (STANDALONE, True))])
    server = metrics.start_metrics_server(0, multiproc_dir, host="127.0.0.1", gpu_collector=GpuCollector(nvml=None))
    try:
        got = scrape(server.server_port)
    finally:
        server.shutdown()
    want = expected(PROCESSES)
    assert {k: got.get(k) for k in want} == pytest.approx(want, rel=1e-12)
    # Triton's names, not prometheus-client's NAME_total; ours keep _total.
    names = {name for name, _ in got}
    assert metrics.REQUEST_SUCCESS in names and metrics.REQUEST_SUCCESS + "_total" not in names
    assert metrics.WORKER_RESTARTS in names
    # Nothing counted that was not recorded (the standalone worker's batches of 8 included).
    inferences = {k: v for k, v in got.items() if k[0] == metrics.INFERENCE_COUNT}
    assert inferences == {k: v for k, v in want.items() if k[0] == metrics.INFERENCE_COUNT}
    requests = {k: v for k, v in got.items() if k[0] == metrics.REQUEST_SUCCESS}
    assert requests == {k: v for k, v in want.items() if k[0] == metrics.REQUEST_SUCCESS}


def test_a_file_being_created_does_not_fail_the_scrape(multiproc_dir: Path) -> None:
    """A process creates its value file empty and sizes it a moment later
    (prometheus/client_python#1199). The supervisor does so when it counts its
    first worker restart; a scrape in that moment was a 500 (a CI failure)."""
    run_all([(record, (WORKER_RGB,))])
    (multiproc_dir / "counter_999999.db").touch()  # created, not yet sized
    (multiproc_dir / "histogram_999999.db").touch()
    server = metrics.start_metrics_server(0, multiproc_dir, host="127.0.0.1", gpu_collector=GpuCollector(nvml=None))
    try:
        got = scrape(server.server_port)
    finally:
        server.shutdown()
    want = expected([WORKER_RGB])
    assert {k: got.get(k) for k in want} == pytest.approx(want, rel=1e-12)


def test_a_file_removed_between_listing_and_reading_is_listed_again(multiproc_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead frontend's gauge files, or shutdown, remove files while a scrape reads."""
    run_all([(record, (WORKER_RGB,))])
    gone = multiproc_dir / "counter_999998.db"
    gone.write_bytes((multiproc_dir / next(p.name for p in multiproc_dir.glob("counter_*.db"))).read_bytes())
    from prometheus_client.multiprocess import MultiProcessCollector
    real_merge = MultiProcessCollector.merge
    calls = []

    def merge_after_removal(files: list[str], accumulate: bool = True) -> Any:
        calls.append(list(files))
        gone.unlink(missing_ok=True)  # removed after the listing, before the read
        return real_merge(files, accumulate)

    monkeypatch.setattr(MultiProcessCollector, "merge", staticmethod(merge_after_removal))
    families = metrics.read_multiproc_files(multiproc_dir)
    assert len(calls) == 2 and str(gone) in calls[0] and str(gone) not in calls[1]
    counts = {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}
    want = expected([WORKER_RGB])
    assert counts[(metrics.INFERENCE_COUNT + "_total", frozenset({("model", "rgb"), ("version", "1")}))] == \
        want[(metrics.INFERENCE_COUNT, frozenset({("model", "rgb"), ("version", "1")}))]


def test_request_histograms_give_quantiles_in_the_right_bucket(multiproc_dir: Path) -> None:
    run_all([(record, (FRONTEND_A,))])
    server = metrics.start_metrics_server(0, multiproc_dir, host="127.0.0.1", gpu_collector=GpuCollector(nvml=None))
    try:
        got = scrape(server.server_port)
    finally:
        server.shutdown()
    buckets = {float(dict(labels)["le"]): v for (name, labels), v in got.items()
               if name == metrics.REQUEST_SECONDS + "_bucket" and dict(labels)["model"] == "rgbd"}
    # FRONTEND_A's successful requests took 1, 2 and 30 ms.
    assert buckets[0.001] == 1 and buckets[0.002] == 2 and buckets[0.02] == 2 and buckets[0.03] == 3
    assert buckets[float("inf")] == 3


def test_ring_gauges_sum_over_live_frontends_and_drop_a_dead_one(multiproc_dir: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    held = []
    for in_use, capacity in ((3, 16), (5, 16)):
        ready, release = ctx.Event(), ctx.Event()
        p = ctx.Process(target=hold_ring, args=(in_use, capacity, ready, release))
        p.start()
        assert ready.wait(120)
        held.append((p, release))
    server = metrics.start_metrics_server(0, multiproc_dir, host="127.0.0.1", gpu_collector=GpuCollector(nvml=None))
    try:
        got = scrape(server.server_port)
        assert got[(metrics.RING_SLOTS_IN_USE, frozenset())] == 8
        assert got[(metrics.RING_SLOTS, frozenset())] == 32
        first, release = held[0]
        release.set()
        first.join(60)
        metrics.process_exited(first.pid, multiproc_dir)  # what the supervisor does when it reaps a child
        got = scrape(server.server_port)
        assert got[(metrics.RING_SLOTS_IN_USE, frozenset())] == 5
        assert got[(metrics.RING_SLOTS, frozenset())] == 16
    finally:
        server.shutdown()
        for p, release in held:
            release.set()
            p.join(60)


def test_prepare_makes_a_private_directory_and_forgets_a_previous_run(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(metrics.MULTIPROC_ENV, "")
    path = tmp_path / "metrics"
    metrics.prepare_multiproc_dir(path)
    run_all([(record, (WORKER_RGB,))])
    assert list(path.glob("*.db")), "the worker wrote no files"
    os.chmod(path, 0o755)
    metrics.prepare_multiproc_dir(path)  # the next run
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert os.environ[metrics.MULTIPROC_ENV] == str(path)
    assert not list(path.glob("*.db"))
    server = metrics.start_metrics_server(0, path, host="127.0.0.1", gpu_collector=GpuCollector(nvml=None))
    try:
        assert not [k for k in scrape(server.server_port) if k[0] == metrics.EXEC_COUNT]
    finally:
        server.shutdown()
    metrics.remove_multiproc_dir(path)
    assert not path.exists()


def test_a_recorder_refuses_when_prometheus_client_came_first(tmp_path: Path) -> None:
    """Set after the import, the variable would be ignored and every count lost in silence."""
    code = ("import os, prometheus_client\n"
            f"os.environ[{metrics.MULTIPROC_ENV!r}] = {str(tmp_path)!r}\n"
            "from dd.metrics import Recorder\n"
            "Recorder()\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "imported before PROMETHEUS_MULTIPROC_DIR was set" in done.stderr


def test_without_a_directory_a_recorder_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    recorder = Recorder()
    assert not recorder.enabled
    for method, args in FRONTEND_A + WORKER_RGB + SUPERVISOR:
        getattr(recorder, method)(*args)
    recorder.set_ring_slots(1, 2)


def test_failure_reasons_follow_triton() -> None:
    assert [metrics.failure_reason(s) for s in ("RESOURCE_EXHAUSTED", "CANCELLED", "DEADLINE_EXCEEDED",
                                                 "INTERNAL", "INVALID_ARGUMENT", "NOT_FOUND")] == [
        "REJECTED", "CANCELED", "CANCELED", "BACKEND", "OTHER", "OTHER"]
    assert set(metrics._REASON_OF_STATUS.values()) <= set(metrics.FAILURE_REASONS)


# ------------------------------------------------------------------ GPUs

class FakeNvml:
    """NVML's Python API as pynvml exposes it, over made-up devices: (uuid, util %, used, total)."""

    class NVMLError(Exception):
        pass

    def __init__(self, devices: list[tuple[str, int, int, int]], broken: tuple[int, ...] = (),
                 init_fails: bool = False) -> None:
        self.devices, self.broken, self.init_fails = devices, broken, init_fails

    def nvmlInit(self) -> None:
        if self.init_fails:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index in self.broken:
            raise self.NVMLError("GPU is lost")
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self.devices[handle][0]

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=self.devices[handle][1], memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(used=self.devices[handle][2], total=self.devices[handle][3], free=0)


GPUS = [("GPU-aaaa", 75, 2 << 30, 80 << 30), ("GPU-bbbb", 0, 1 << 20, 80 << 30), ("GPU-cccc", 100, 5, 10)]


def gpu_samples(collector: GpuCollector) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels["gpu_uuid"]): s.value for family in collector.collect() for s in family.samples}


def test_gpu_metrics_per_gpu_from_nvml(multiproc_dir: Path) -> None:
    collector = GpuCollector(nvml=FakeNvml(GPUS, broken=(2,)))
    server = metrics.start_metrics_server(0, multiproc_dir, host="127.0.0.1", gpu_collector=collector)
    try:
        got = scrape(server.server_port)
    finally:
        server.shutdown()
    assert got[(metrics.GPU_UTILIZATION, frozenset({("gpu_uuid", "GPU-aaaa")}))] == 0.75
    assert got[(metrics.GPU_MEMORY_USED_BYTES, frozenset({("gpu_uuid", "GPU-aaaa")}))] == 2 << 30
    assert got[(metrics.GPU_MEMORY_TOTAL_BYTES, frozenset({("gpu_uuid", "GPU-bbbb")}))] == 80 << 30
    assert not [k for k in got if ("gpu_uuid", "GPU-cccc") in k[1]]  # the lost GPU is left out, no error


def test_gpu_metrics_only_for_the_gpus_served() -> None:
    got = gpu_samples(GpuCollector(gpus=[1], nvml=FakeNvml(GPUS)))
    assert {uuid for _, uuid in got} == {"GPU-bbbb"}


def test_nvml_is_loaded_at_the_first_scrape_not_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervisor creates the collector before it starts the zygote: NVML's load (0.1 s) waits for a
    scrape instead of holding up every start (issue #18, start-up)."""
    loads = []
    monkeypatch.setattr(metrics, "_load_nvml", lambda: loads.append(1) or FakeNvml(GPUS))
    collector = GpuCollector()
    assert loads == []
    assert {uuid for _, uuid in gpu_samples(collector)} == {"GPU-aaaa", "GPU-bbbb", "GPU-cccc"}
    gpu_samples(collector)
    assert loads == [1]


def test_no_nvml_exports_no_gpu_metrics_and_raises_nothing(multiproc_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed
    assert not GpuCollector().available
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(GPUS, init_fails=True))  # installed, no driver
    collector = GpuCollector()
    assert not collector.available
    assert list(collector.collect()) == []
    server = metrics.start_metrics_server(0, multiproc_dir, host="127.0.0.1", gpu_collector=collector)
    try:
        assert not [k for k in scrape(server.server_port) if k[0].startswith("nv_gpu_")]
    finally:
        server.shutdown()


def test_the_default_gpu_collector_works_on_this_machine() -> None:
    """Here (CI has no GPU) NVML is missing or finds no driver; on a GPU host it reads them."""
    collector = GpuCollector()
    samples = gpu_samples(collector)
    assert bool(samples) == (collector.available and collector._nvml.nvmlDeviceGetCount() > 0)


@pytest.mark.parametrize("tls", [False, True])
def test_a_client_that_connects_and_says_nothing_blocks_no_scrape(multiproc_dir: Path, tmp_path: Path,
                                                                  tls: bool) -> None:
    """Each connection has its own thread, the TLS handshake included (prometheus-client's own server does
    the handshake in its accepting thread, so one silent client stopped every scrape), and a timeout."""
    import socket
    import ssl

    from tests.integration.test_security import PKI

    run_all([(record, (WORKER_RGB,))])
    pki = PKI(tmp_path / "pki") if tls else None
    server = metrics.start_metrics_server(0, multiproc_dir, host="127.0.0.1", gpu_collector=GpuCollector(nvml=None),
                                          certfile=pki.path("server.pem") if pki else None,
                                          keyfile=pki.path("server.key") if pki else None)
    silent = [socket.create_connection(("127.0.0.1", server.server_port)) for _ in range(3)]
    try:
        scheme = "https" if tls else "http"
        context = ssl.create_default_context(cafile=str(pki.ca)) if pki else None
        text = urllib.request.urlopen(f"{scheme}://127.0.0.1:{server.server_port}/metrics", timeout=5,
                                      context=context).read().decode()
        assert f'{metrics.INFERENCE_COUNT}{{model="rgb",version="1"}} 4.0' in text
    finally:
        for s in silent:
            s.close()
        server.shutdown()
        server.server_close()
