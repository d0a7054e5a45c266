"""--metrics-port on a real `deep-detection serve`: what its endpoint shows is exactly what was sent.

Two frontends and a null-engine worker (tests/faults.py). The endpoint is scraped before and
after a known number of requests (answered, bad input, an unknown model) and the counters
must have moved by exactly that, summed over both frontends. Every count the test reads is
written before the response it belongs to leaves the server (the worker counts a batch before
it replies, a frontend counts a request before it answers), so a scrape after the last
response needs no waiting; a restart is polled for until the supervisor has done it.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from dd import metrics
from dd.proto.deep_detection.v1 import detector_pb2 as pb
from tests.faults import Server, answer_problem, detect, null_case, null_model, wait_for
from tests.serverproc import REPO, free_port

import grpc

MODEL = "null"
LABELS = {"model": MODEL, "version": "1"}


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample of the endpoint, parsed by prometheus_client's own parser (which fails on bad text)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def bad_case(i: int) -> pb.DetectRequest:
    """Not an image: the frontend refuses it with INVALID_ARGUMENT while decoding."""
    return pb.DetectRequest(request_id=f"bad{i}", color=pb.Image(data=b"not a jpeg %d" % i, encoding=pb.Image.ENCODED))


def status_of(request: pb.DetectRequest, target: str) -> grpc.StatusCode:
    try:
        detect(target, request)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_counters_move_by_exactly_what_was_sent_and_survive_restarts(tmp_path: Path) -> None:
    null_model(tmp_path / MODEL, batch=4, cost_ms=1)
    port = free_port()
    with Server(tmp_path / MODEL, frontends=2, ring_slots=8, slot_mb=0.0625,
                args=["--metrics-port", str(port)]) as srv:
        srv.start().wait_serving(120)
        wait_for(lambda: len(srv.processes("frontend")) == 2 and len(srv.rings()) == 2, 60, "two frontends")
        assert (srv.run_dir / "metrics").is_dir()
        before = scrape(port)
        start_gens = {r.name: r.generations for r in srv.rings()}

        # Answered requests, on fresh connections, until both frontends have served some (the kernel
        # spreads connections over them); the exact number sent is what counts.
        n_ok = 0
        for i in range(400):
            case = null_case(i)
            assert answer_problem(case, detect(srv.target, case.request)) is None
            n_ok += 1
            if n_ok >= 8 and all(r.generations > start_gens.get(r.name, 0) for r in srv.rings()):
                break
        assert all(r.generations > start_gens.get(r.name, 0) for r in srv.rings()), "one frontend got nothing"
        n_bad, n_unknown = 5, 3
        assert {status_of(bad_case(i), srv.target) for i in range(n_bad)} == {grpc.StatusCode.INVALID_ARGUMENT}
        unknown = [null_case(1000 + i, model="no-such-model").request for i in range(n_unknown)]
        assert {status_of(r, srv.target) for r in unknown} == {grpc.StatusCode.NOT_FOUND}
        after = scrape(port)

        assert delta(before, after, metrics.REQUEST_SUCCESS, **LABELS) == n_ok
        assert delta(before, after, metrics.REQUEST_FAILURE, **LABELS, reason="OTHER") == n_bad
        # A model that is not served is counted without its name: clients cannot mint label values.
        assert delta(before, after, metrics.REQUEST_FAILURE, model="", version="1", reason="OTHER") == n_unknown
        assert not any(("model", "no-such-model") in labels for _, labels in after)
        assert delta(before, after, metrics.INFERENCE_COUNT, **LABELS) == n_ok  # the worker's count
        execs = delta(before, after, metrics.EXEC_COUNT, **LABELS)
        assert 1 <= execs <= n_ok  # however the requests happened to batch
        assert delta(before, after, metrics.BATCH_SIZE + "_sum", **LABELS) == n_ok
        assert delta(before, after, metrics.BATCH_SIZE + "_count", **LABELS) == execs
        assert delta(before, after, metrics.REQUEST_DURATION_US, **LABELS) > 0
        assert delta(before, after, metrics.COMPUTE_INFER_DURATION_US, **LABELS) >= n_ok * 1000 * 0.9  # cost_ms=1
        assert delta(before, after, metrics.REQUEST_DURATION_US, **LABELS) >= \
            delta(before, after, metrics.COMPUTE_INFER_DURATION_US, **LABELS)
        for hist in (metrics.REQUEST_SECONDS, metrics.QUEUE_SECONDS, metrics.COMPUTE_INFER_SECONDS,
                     metrics.DECODE_SECONDS):
            assert delta(before, after, hist + "_count", **LABELS) == n_ok, hist
        assert value(after, metrics.RING_SLOTS) == 16  # 2 frontends x 8 slots
        assert value(after, metrics.RING_SLOTS_IN_USE) == 0
        assert not [name for name, _ in after if name.startswith("nv_gpu_")], "a CPU-only server has no GPU samples"

        # A worker killed: restarted and counted; the counts it made stay, and its successor's add to them.
        srv.worker(MODEL, 0).kill()
        wait_for(lambda: value(scrape(port), metrics.WORKER_RESTARTS, model=MODEL) == 1, 60, "the restart counted")
        wait_for(lambda: srv.ready_workers(MODEL) == 1, 60, "the restarted worker to be ready")
        mid = scrape(port)
        assert value(mid, metrics.INFERENCE_COUNT, **LABELS) == value(after, metrics.INFERENCE_COUNT, **LABELS)
        for i in range(6):
            case = null_case(2000 + i)
            assert answer_problem(case, detect(srv.target, case.request)) is None
        again = scrape(port)
        assert delta(mid, again, metrics.INFERENCE_COUNT, **LABELS) == 6
        assert delta(mid, again, metrics.REQUEST_SUCCESS, **LABELS) == 6

        # A frontend killed: its ring no longer counts once reaped (before its successor starts); the
        # successor's does, for certain once it has served a request.
        old = {p.pid for p in srv.processes("frontend")}
        victim = srv.processes("frontend")[0]
        victim.kill()
        new = wait_for(lambda: [p for p in srv.processes("frontend") if p.pid not in old], 60,
                       "the frontend's restart")[0]
        new_ring = wait_for(lambda: [r.name for r in srv.rings() if r.name.endswith(f"-{new.pid}")], 60,
                            "the new frontend's ring")[0]
        for i in range(400):
            case = null_case(3000 + i)
            assert answer_problem(case, detect(srv.target, case.request)) is None
            if {r.name: r.generations for r in srv.rings()}.get(new_ring, 0) > 0:
                break
        final = scrape(port)
        assert value(final, metrics.RING_SLOTS) == 16, "the dead frontend's ring still counts"
        assert value(final, metrics.RING_SLOTS_IN_USE) == 0
        assert value(final, metrics.WORKER_RESTARTS, model=MODEL) == 1  # frontends are not workers
        srv.stop()
        assert not (srv.run_dir / "metrics").exists(), "the metrics files are removed at shutdown"


def test_with_metrics_off_no_process_records(tmp_path: Path) -> None:
    """--metrics-port 0: no endpoint, and no child writes into a PROMETHEUS_MULTIPROC_DIR of the caller's."""
    null_model(tmp_path / MODEL)
    theirs = tmp_path / "someone-elses-metrics"
    theirs.mkdir()
    with Server(tmp_path / MODEL, env={metrics.MULTIPROC_ENV: str(theirs)}, args=["--metrics-port", "0"]) as srv:
        srv.start().wait_serving(120)
        for i in range(3):
            case = null_case(i)
            assert answer_problem(case, detect(srv.target, case.request)) is None
        assert not (srv.run_dir / "metrics").exists()
    assert list(theirs.iterdir()) == []


def test_metrics_port_in_use_is_refused_before_anything_starts(tmp_path: Path) -> None:
    model = null_model(tmp_path / MODEL)
    run_dir = tmp_path / "run"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "dd", "serve", str(model), "--host", "127.0.0.1", "--port",
                              str(free_port()), "--metrics-port", str(port), "--run-dir", str(run_dir)],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 2, res.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in res.stderr and "--metrics-port" in res.stderr, res.stderr
    assert not run_dir.exists(), "the run directory and its lock are removed again"


@pytest.mark.parametrize("argv, problem", [(["--metrics-port", "70000"], "metrics_port must be in [0, 65535]"),
                                           (["--port", "9000", "--metrics-port", "9000"], "is the gRPC port too")])
def test_bad_metrics_port_is_a_configuration_error(argv: list[str], problem: str) -> None:
    from dd.cli import _server_config, build_parser
    from dd.config import ConfigError

    with pytest.raises(ConfigError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        _server_config(build_parser().parse_args(["serve", "x", *argv]))
    assert _server_config(build_parser().parse_args(["serve", "x"])).metrics_port == 8002  # Triton's
    assert _server_config(build_parser().parse_args(["serve", "x", "--metrics-port", "0"])).metrics_port == 0
