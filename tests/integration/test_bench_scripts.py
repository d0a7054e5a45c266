"""The benchmark scripts (scripts/bench_serve.py, bench_startup.py, bench_mixed_sizes.py).

The lead runs them once on a GPU with a fixed device budget, so they must work the first time:
the slow tests run each end to end on this machine (null engine, tiny frames, real servers) and
check that every output is written and parses; the quick ones check what they read from a
server's log and how they judge the goals.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_frontend_cpu  # noqa: E402
import bench_mixed_sizes  # noqa: E402
import bench_requests  # noqa: E402
import bench_serve  # noqa: E402
import bench_startup  # noqa: E402
import thread_stacks  # noqa: E402
import thread_states  # noqa: E402


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _stamp(wall: float) -> str:
    ms = int(round((wall % 1) * 1000))
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(wall))) + f",{ms:03d}"


# -- what the scripts read from a server's log ------------------------------------------------------
def test_log_events_parse_start_up_phases_captures_and_restarts() -> None:
    t0 = 1_800_000_000.0
    log = "\n".join([
        f"{_stamp(t0 + 0.1)} INFO [supervisor] started the worker zygote (pid 40), importing dd.worker.server",
        f"{_stamp(t0 + 0.15)} INFO [supervisor] started frontend-0 (pid 39)",
        f"{_stamp(t0 + 0.19)} INFO [supervisor] worker zygote ready: imports took 0.1 s",
        f"{_stamp(t0 + 0.2)} INFO [supervisor] started worker-bench.0 (pid 41, forked with its imports done)",
        f"{_stamp(t0 + 0.3)} INFO [worker-bench.0] worker bench.0 listening on /tmp/r/w-bench.0.sock (device cpu)",
        f"{_stamp(t0 + 9.5)} INFO [worker-bench.0] fast engine loaded in 9.1 s: weights and model 1.2 s, fusing and "
        "kernels 3.4 s, warm-up and graph captures 4.5 s",
        f"{_stamp(t0 + 9.0)} INFO [worker-bench.0] captured the network for 8 image(s) of 1333x750 + torch.uint16 "
        "depth in 0.3 s (warm-up runs 0.1 s)",
        f"{_stamp(t0 + 9.6)} INFO [worker-bench.0] worker bench.0 loaded fast engine in 9.4 s",
        f"{_stamp(t0 + 9.61)} INFO [frontend-0] worker bench.0 ready",
        f"{_stamp(t0 + 20.0)} INFO [worker-bench.0] captured the network for 1 image(s) of 1067x800 + torch.uint16 "
        "depth in the background in 0.4 s; its requests were served op by op meanwhile",
        f"{_stamp(t0 + 21.0)} WARNING [worker-bench.0] captured the network for 1 image(s) of 1333x750 in 6.1 s "
        "while serving; add [1080, 1920] to ENGINE_OPTIONS warmup_sizes to capture it at load",
        f"{_stamp(t0 + 30.0)} WARNING [supervisor] worker-bench.0 (pid 41) exited with signal SIGKILL after 29.8 s; "
        "restarting in 0.2 s",
        "a line without a stamp: captured the network for 2 image(s) of 640x480 in the background in 0.2 s; x",
        f"{_stamp(t0 + 31.0)} INFO [frontend-0] nothing to see",
    ])
    events = bench_requests.log_events(log, t0)
    assert [e["kind"] for e in events] == ["zygote_started", "started", "zygote_ready", "started", "worker_listening",
                                           "engine_load", "capture_at_load", "worker_loaded", "ready_at_frontend",
                                           "capture_while_serving", "capture_while_serving", "restart",
                                           "capture_while_serving"]
    assert events[9]["at_s"] == pytest.approx(20.0, abs=0.01)
    assert events[12]["at_s"] is None
    ph = bench_startup.phases(events)
    assert ph["zygote"] == {"started_at_s": 0.1, "imports_s": 0.1, "ready_at_s": 0.19}
    assert [s["what"] for s in ph["started"]] == ["frontend-0", "worker-bench.0"]
    assert ph["worker_listening"][0]["at_s"] == 0.3 and ph["ready_at_frontend"][0]["at_s"] == 9.61
    assert ph["engine_load"][0]["warmup_and_captures_s"] == 4.5
    assert ph["worker_loaded"][0]["load_s"] == 9.4
    assert ph["captures_at_load"][0]["s"] == 0.3
    assert [c["s"] for c in ph["captures_while_serving"]] == [0.4, 6.1, 0.2]
    assert ph["restarts"][0]["delay_s"] == 0.2 and ph["restarts"][0]["exit"] == "signal SIGKILL"


def test_log_events_parse_the_compressed_warm_up_and_the_rings_prepared() -> None:
    t0 = 1_800_000_000.0
    log = "\n".join([
        f"{_stamp(t0 + 3.1)} INFO [worker-bench.0] warmed up compressed inputs (a JPEG on the GPU: yes; PNG depth "
        "rows: yes) in 0.66 s",
        f"{_stamp(t0 + 3.5)} INFO [worker-bench.0] worker bench.0 prepared 4 frontend ring(s) for its engine in 0.29 s"])
    ph = bench_startup.phases(bench_requests.log_events(log, t0))
    assert ph["compressed_warmup"] == [{"jpeg": True, "png_rows": True, "s": 0.66}]
    assert ph["rings_prepared"] == [{"worker": "bench.0", "rings": 4, "s": 0.29, "at_s": 3.5}]


def test_mixed_sizes_goal_per_size() -> None:
    records = [("a", 0.0, 10.0, "OK"), ("a", 0.1, 10.0, "OK"), ("a", 0.2, 29.0, "OK"),
               ("b", 0.0, 10.0, "OK"), ("b", 0.1, 10.0, "OK"), ("b", 0.2, 31.0, "OK"),
               ("c", 0.0, 10.0, "OK"), ("c", 0.1, 5.0, "UNAVAILABLE")]
    out = bench_mixed_sizes.per_size(records, ["a", "b", "c", "d"], 3.0)
    assert out["a"]["met"] and out["a"]["max_over_p50"] == pytest.approx(2.9)
    assert not out["b"]["met"]
    assert not out["c"]["met"] and out["c"]["errors_by_code"] == {"UNAVAILABLE": 1}
    assert out["d"] == {"n": 0, "errors_by_code": {}, "met": False}


def test_time_split_derives_client_transport_and_frontend_handoffs() -> None:
    r = {"n": 10, "p50_ms": 9.0, "median_total_us": 6000.0, "median_decode_us": 1000.0, "median_queued_us": 500.0,
         "median_inference_us": 3000.0, "median_postprocess_us": 700.0}
    split = bench_serve.time_split(r)
    assert split["client_transport"] == pytest.approx(3.0)
    assert split["frontend_handoffs"] == pytest.approx(0.8)
    assert bench_serve.time_split({"n": 3, "p50_ms": 1.0}) is None  # a server without timings
    results = {"kinds": ["raw"], "served": {"4": {"raw": {"64": {**r, "p50_ms": 50.0}, "1": r}}}}
    lines = bench_serve.time_split_table(results)
    rows = [line for line in lines if line.startswith("| raw |")]
    assert rows == ["| raw | 4 | 1 | 9.00 | 6.00 | 1.00 | 0.50 | 3.00 | 0.70 | 3.00 | 0.80 |"]  # the lowest concurrency


def test_hop_medians_are_the_steps_between_consecutive_hops() -> None:
    import bench_requests

    hops = bench_requests.TRACE_HOPS
    whole = [{h: 10.0 + k * step for k, h in enumerate(hops)} for step in (0.001, 0.003)]  # 1 and 3 ms a step
    partial = {h: 1.0 for h in hops[:4]}  # a server that does not trace: left out
    got = bench_requests.hop_medians([*whole, partial])
    assert list(got) == [f"{a}>{b}" for a, b in zip(hops, hops[1:])]
    assert all(v == pytest.approx(2.0) for v in got.values())
    assert bench_requests.hop_medians([partial]) == {}


def test_requests_of_each_kind_decode_to_the_same_frame() -> None:
    frames = bench_requests.scenes(1, 48, 64)
    color, depth = frames[0]
    kinds = ["jpeg+png", "raw"] + (["jpeg+zstd"] if bench_requests.zstd_available() else [])
    for kind in kinds:
        req = bench_requests.encode_request(kind, color, depth)
        c, d = bench_requests.decode_request(req)
        assert c.shape == color.shape and d.dtype == depth.dtype
        assert (d == depth).all()  # depth is lossless in every kind
        if kind == "raw":
            assert (c == color).all()


# -- end to end, tiny -----------------------------------------------------------------------------------
def _run(argv: list[str], timeout: float) -> str:
    done = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


TINY = ["--height", "96", "--width", "128", "--min-size", "96", "--detections", "5", "--batch", "2"]


def test_bench_serve_variants_parse_into_flags_or_engine_options() -> None:
    got = bench_serve.parse_variants(["nice5=--frontend-nice=5 --max-pending 9", 'bsync={"blocking_sync": true}'])
    assert got == {"": ([], None), "nice5": (["--frontend-nice=5", "--max-pending", "9"], None),
                   "bsync": ([], {"blocking_sync": True})}
    assert list(bench_serve.parse_variants(["a=--x"], no_plain=True)) == ["a"]
    for bad in ("nolabel", "=--x", "a b=--x"):
        with pytest.raises(SystemExit):
            bench_serve.parse_variants([bad])


@pytest.mark.slow
def test_bench_serve_serves_each_variant_in_one_run(tmp_path: Path) -> None:
    out = tmp_path / "serve"
    _run(["scripts/bench_serve.py", "--engine", "null", "--arch", "small", "--device", "cpu", *TINY,
          "--engine-batches", "2", "--encodings", "raw", "--concurrency", "1", "--frontends", "1", "--seconds", "0.5",
          "--frames", "2", "--no-baseline", "--no-plain", "--variant", "nice3=--frontend-nice=3",
          "--variant", 'opts={"warmup_sizes": [[96, 128]]}', "--out", str(out)], timeout=280)
    res = json.loads((out / "serve.json").read_text())
    assert set(res["served"]) == {"1 nice3", "1 opts"}
    for per in res["served"].values():
        assert per["raw"]["1"]["n"] > 0 and per["raw"]["1"]["errors"] == 0, per
    md = (out / "serve.md").read_text()
    assert "| served (deep-detection serve) | raw | 1 nice3 | 1 |" in md and "| raw | 1 opts | 1 |" in md
    assert (out / "serve_frontends1_nice3.log").exists() and (out / "serve_frontends1_opts.log").exists()


@pytest.mark.slow
def test_bench_serve_writes_table_json_and_pictures(tmp_path: Path) -> None:
    out = tmp_path / "serve"
    _run(["scripts/bench_serve.py", "--engine", "null", "--arch", "small", "--device", "cpu", *TINY,
          "--engine-batches", "2", "--encodings", "jpeg+png", "raw", "jpeg+zstd", "jpeg+png-lib", "--concurrency", "1", "2",
          "--frontends", "1", "2", "--seconds", "0.5", "--frames", "2", "--client-procs", "2", "--out", str(out)],
         timeout=280)
    res = json.loads((out / "serve.json").read_text())
    kinds = res["kinds"]
    assert kinds[:2] == ["jpeg+png", "raw"] and kinds[-1] == "jpeg+png-lib"
    assert set(res["engine"]) == {"batch1", "batch2"} and res["engine_best"] in res["engine"]
    assert set(res["core"]) == set(res["pipelined"]) == {"batch1", "batch2"}
    assert all(r["images_per_s"] > 0 for what in ("engine", "core", "pipelined") for r in res[what].values())
    assert set(res["in_process"]) == set(kinds)
    for f in ("1", "2"):
        per = res["served"][f]
        for kind in ("jpeg+png", "raw", "jpeg+png-lib"):  # every server takes these
            for c in ("1", "2"):
                r = per[kind][c]
                assert r["n"] > 0 and r["errors"] == 0, r
                assert r["cpu_ms_per_image"]["frontend"] > 0 and r["cpu_ms_per_image"]["worker"] > 0
                if sys.platform.startswith("linux"):  # by thread, from /proc
                    threads = r["thread_cpu_ms_per_image"]
                    assert "worker: inference" in threads and "frontend: main thread" in threads, threads
        if "jpeg+zstd" in kinds:  # answered, or skipped with the server's reason
            assert "jpeg+zstd" in per or "jpeg+zstd" in per["_skipped"]
    for kind in kinds:
        assert res["baseline"][kind]["1"]["n"] > 0
    md = (out / "serve.md").read_text()
    assert md.count("| served (deep-detection serve) | jpeg+png |") == 4
    assert md.count("| baseline (single-process gRPC server) |") == 2 * len(kinds)
    assert "(best)" in md and md.count("| worker core, pipelined (as a worker serves), batch") == 2
    assert "Where a served request's time goes" in md and sum(line.startswith("| raw | ") for line in md.splitlines()) == 2  # per frontends
    lone = res["served"]["1"]["raw"]["1"]  # every second request at concurrency 1 traced, hop by hop
    assert lone["traced"] > 0 and len(lone["hops_ms"]) == 10 and all(v >= 0 for v in lone["hops_ms"].values())
    assert "traced" not in res["served"]["1"]["raw"]["2"]
    assert "### A lone request's hops" in md and "| replied > arrived | " in md
    assert (out / "serve_frontends1.log").exists() and (out / "baseline.log").exists()
    if sys.platform.startswith("linux"):
        assert "### Server CPU by thread" in md and "| worker: inference | " in md
    if _has_matplotlib():
        assert (out / "serve_throughput.png").stat().st_size > 0 and (out / "serve_latency.png").stat().st_size > 0


@pytest.mark.slow
def test_bench_startup_times_starts_and_a_killed_worker(tmp_path: Path) -> None:
    out = tmp_path / "startup"
    _run(["scripts/bench_startup.py", "--engine", "null", "--arch", "small", "--device", "cpu", *TINY,
          "--frontends", "1", "--kill-concurrency", "2", "--kill-before", "1.5", "--kill-after", "0.5",
          "--timeout", "120", "--out", str(out)], timeout=280)
    res = json.loads((out / "startup.json").read_text())
    assert set(res["models"]) == {"demo-rgbd", "random small (5 detections)"}
    for runs in res["models"].values():
        for start in ("cold", "warm"):
            assert runs[start]["start_to_serving_s"] > 0
            assert runs[start]["phases"]["worker_loaded"][0]["engine"] == "null"
    kill = res["kill"]
    assert kill["recovered_within_timeout"] and kill["recovered_s"] > 0
    assert kill["restart_delay_s"] is not None and kill["new_worker_load_s"] is not None
    md = (out / "startup.md").read_text()
    assert "| demo-rgbd | cold |" in md and "kill to the first OK answer sent after it" in md


@pytest.mark.slow
def test_startup_phases_times_each_phase_of_a_null_server(tmp_path: Path) -> None:
    from tests.faults import null_model

    out = tmp_path / "phases"
    _run(["scripts/startup_phases.py", "--model", str(null_model(tmp_path / "m")), "--runs", "1",
          "--checkout", f"this={REPO}", "--out", str(out)], timeout=280)
    res = json.loads((out / "startup_phases.json").read_text())
    run = res["runs"]["this"][0]
    # Each before the next by cause (one process's own order, or a message between them): compared, not timed.
    for chain in (["zygote_started", "first_frontend_started", "zygote_ready", "worker_started"],
                  ["worker_loaded", "ready_at_frontend", "serving"], ["found_worker", "ready_at_frontend"]):
        assert [run[k] for k in chain] == sorted(run[k] for k in chain), (chain, run)
    assert set(res["summary"]["this"]["gap_median_s"]) == {"first_spawn", "discover", "ready", "serving"}


def test_bench_imports_times_the_zygotes_imports_of_each_checkout() -> None:
    """The null engine's preload (no torch): quick, and still the zygote's exact list."""
    out = _run(["scripts/bench_imports.py", "--engine", "null", "--runs", "1", "--checkout", f"a={REPO}",
                "--checkout", f"b={REPO}"], timeout=120)
    lines = out.splitlines()
    assert lines[0].startswith("| zygote for null: start to ready, 1 runs each") and lines[0].endswith("| a | b |")
    assert "| imports torch._dynamo | False | False |" in lines
    assert any(ln.startswith("| of one `-X importtime` run: dd.worker.server | 0.") for ln in lines), out


def test_thread_delta_adds_a_pool_and_names_its_busiest_thread() -> None:
    before = {1: ("frontend: main thread", 1.0), 2: ("frontend: decode", 2.0), 3: ("frontend: decode", 0.5)}
    after = {1: ("frontend: main thread", 1.5), 2: ("frontend: decode", 2.1), 3: ("frontend: decode", 1.0),
             4: ("frontend: decode", 0.2)}  # a thread started meanwhile counts from 0
    delta = bench_requests.thread_delta(before, after)
    assert delta["frontend: main thread"] == 0.5 and "frontend: main thread (busiest)" not in delta
    assert abs(delta["frontend: decode"] - 0.8) < 1e-9 and delta["frontend: decode (busiest)"] == 0.5


@pytest.mark.skipif(not Path("/proc/self/schedstat").exists(), reason="the kernel keeps no schedstats")
def test_thread_times_give_each_thread_its_cpu_and_its_wait_for_a_core() -> None:
    """Under -tid, "NAME (waiting for a core)": what the kernel's schedstat says the thread waited ready to run;
    thread_cpu (CPU only) leaves those out."""
    import psutil

    times = bench_requests.thread_times(psutil.Process())
    main = psutil.Process().pid
    assert times[main][0] == "main thread" and times[main][1] > 0
    assert times[-main][0] == "main thread (waiting for a core)" and times[-main][1] >= 0
    assert all((tid > 0) != name.endswith("(waiting for a core)") for tid, (name, _) in times.items())
    assert not any(name.endswith("(waiting for a core)") for name in bench_requests.thread_cpu(psutil.Process()))


def test_busy_main_thread_leaves_out_samples_waiting_in_epoll(tmp_path: Path) -> None:
    raw = tmp_path / "spy.txt"
    raw.write_text("\n".join([
        "thread (1): MainThread;run (asyncio/runners.py:1);select (selectors.py:468);epoll_wait (libc.so.6) 90",
        "thread (1): MainThread;run (asyncio/runners.py:1);read_one (dd/frontend/protocols/one_message.py:32) 6",
        "thread (1): MainThread;run (asyncio/runners.py:1);_admit (dd/frontend/requests.py:133) 4",
        "thread (7): decode_0;decode (dd/frontend/decode.py:1) 50"]) + "\n")
    lines = bench_frontend_cpu.busy_main_thread(raw)
    assert lines[0].startswith("main thread: 10 of 100 samples busy (10%)")
    assert lines[1].endswith("run (asyncio/runners.py:1)") and "100.0%" in lines[1]
    assert "60.0%" in lines[2] and "read_one" in lines[2] and "40.0%" in lines[3] and "_admit" in lines[3]


@pytest.mark.parametrize("strings", [[], ["--rle-text"]], ids=["list", "rle-text"])
def test_bench_encode_times_each_protocol_for_each_checkout(strings: list[str]) -> None:
    out = _run(["scripts/bench_encode.py", "--checkout", f"a={REPO}", "--checkout", f"b={REPO}", "--rounds", "1",
                "--encodes", "2", "--cases", "3x10", "20x4000", *strings], timeout=120)
    lines = out.splitlines()
    assert lines[1] == "| protocol, instances x mask bytes | a | b |", out
    for protocol in ("detector_v1", "kserve_v2"):  # a time in each checkout's column, whatever the machine's load
        for case in ("3 x 10 B", "20 x 4000 B"):  # protobuf's way, and the wire format written directly
            row = next(ln for ln in lines if ln.startswith(f"| {protocol} {case} | "))
            assert len(re.findall(r"\| \d+\.\d{3} \(\d+\.\d{3}-\d+\.\d{3}\)", row)) == 2, row


@pytest.mark.slow
def test_bench_mixed_sizes_reports_each_size(tmp_path: Path) -> None:
    out = tmp_path / "mixed"
    _run(["scripts/bench_mixed_sizes.py", "--engine", "null", "--arch", "small", "--device", "cpu",
          "--sizes", "128x96", "160x120", "--warmup", "128x96", "--min-size", "96", "--detections", "5",
          "--batch", "2", "--frontends", "1", "--seconds", "1.5", "--frames-per-size", "2", "--out", str(out)],
         timeout=200)
    res = json.loads((out / "mixed.json").read_text())
    assert set(res["sizes"]) == {"128x96", "160x120"}
    assert all(r["n"] > 0 for r in res["sizes"].values())
    assert res["captures_while_serving"] == []  # the null engine captures nothing
    assert isinstance(res["goal_met"], bool)
    assert "| 160x120 |" in (out / "mixed.md").read_text()
    if _has_matplotlib():
        assert (out / "mixed.png").stat().st_size > 0


@pytest.mark.slow
def test_bench_client_shm_measures_three_ways_in(tmp_path: Path) -> None:
    out = tmp_path / "shm.json"
    _run(["scripts/bench_client_shm.py", "--requests", "3", "--height", "96", "--width", "128", "--json", str(out)],
         timeout=200)
    res = json.loads(out.read_text())
    assert set(res) == {"in the message", "in shared memory", "inputs and outputs in shared memory"}
    assert all(r["p50_ms"] > 0 and r["client_cpu_ms"] > 0 for r in res.values())
    assert all(r["server_ms"]["total"] > 0 and r["server_ms"]["inference"] > 0 for r in res.values())
    assert all(len(r["hops_ms"]) == 10 and min(r["hops_ms"].values()) >= 0 for r in res.values())  # traced ones


@pytest.mark.slow
def test_bench_fixed_cost_compares_trees_with_the_grpc_floor(tmp_path: Path) -> None:
    out = tmp_path / "fixed"
    _run(["scripts/bench_fixed_cost.py", "--tree", f"a={REPO}", "--tree", f"b={REPO}", "--rounds", "2",
          "--requests", "2", "--height", "96", "--width", "128", "--out", str(out)], timeout=250)
    rows = json.loads((out / "fixed_cost.json").read_text())["rows"]
    assert {(r["tree"], r["kind"]) for r in rows} == {(t, k) for t in ("a", "b", "grpc floor")
                                                      for k in ("raw 128x96", "kserve shm 128x96")}
    for r in rows:
        assert r["n"] == 4 and r["p50_ms"] > 0
        if r["tree"] != "grpc floor":
            assert r["total_ms"] > 0 and r["inference_ms"] > 0 and "client_transport_ms" in r
    assert "| kserve shm 128x96 | grpc floor |" in (out / "fixed_cost.md").read_text()


@pytest.mark.slow
def test_bench_first_request_compares_the_first_request_with_later_ones() -> None:
    text = _run(["scripts/bench_first_request.py", "--tree", f"a={REPO}", "--rounds", "1", "--requests", "3",
                 "--height", "96", "--width", "128"], timeout=250)
    (row,) = [line for line in text.splitlines() if line.startswith("| a |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 5 and all(float(c) > 0 for c in cells[1:])


@pytest.mark.slow
def test_bench_conv_first_call_tables_first_and_second_calls() -> None:
    text = _run(["scripts/bench_conv_first_call.py", "--device", "cpu", "--channels", "8"], timeout=250)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "first / second" not in line]
    assert len(rows) == 8  # four convolutions, two layouts, fp32 (the CPU has no cuDNN and no native path)
    assert all(len(r.strip("|").split("|")) == 6 for r in rows)


def _host_path_smoke(tmp_path: Path, timeout: float, **settings: str) -> str:
    """scripts/gpu_host_path.sh in SMOKE mode (CPU, tiny frames, no wheels) into tmp_path/out; its output."""
    import os

    env = dict(os.environ, SMOKE="1", OUT=str(tmp_path / "out"), WHL=str(tmp_path / "no-wheels"), PY=sys.executable,
               **settings)
    done = subprocess.run(["bash", "scripts/gpu_host_path.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return done.stdout + done.stderr


@pytest.mark.slow
def test_gpu_host_path_runs_every_step_on_a_cpu(tmp_path: Path) -> None:
    """scripts/gpu_host_path.sh in SMOKE mode: the device call's steps, each writing what summary.md gathers."""
    log = _host_path_smoke(tmp_path, 400, VARIANTS='n3=--frontend-nice=3')
    for name in ("decode", "serve", "client_shm", "startup"):
        assert f"== {name}: exit 0" in log, log[-4000:]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "## serve/serve.md" in summary and "| jpeg+png-lib | 0 n3 |" in summary, summary[-3000:]
    assert "## startup/startup.md" in summary and (tmp_path / "out" / "host_path.tgz").stat().st_size > 0


@pytest.mark.slow
def test_gpu_host_path_worker_step_splits_the_pipelined_loop(tmp_path: Path) -> None:
    """STEPS=worker: profile_worker.py's host time by phase lands in summary.md, with its CPU profile in the archive."""
    import tarfile

    log = _host_path_smoke(tmp_path, 300, STEPS="worker")
    assert "== worker: exit 0" in log and "== serve" not in log, log[-4000:]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "## worker.log" in summary
    with tarfile.open(tmp_path / "out" / "host_path.tgz") as tar:
        names = tar.getnames()
        row = json.load(tar.extractfile("./worker/worker.json"))["batches"]["2"]  # type: ignore[arg-type]
    assert "./worker/cprofile_pipelined_cpu_batch2.txt" in names
    assert row["pipelined_cycle_cpu_ms"] > 0 and row["pipelined_start_wall_ms"] > 0


DUMP = """Process 16331: python -c ...
Python v3.11.7 (/usr/bin/python3.11)

Thread 16330 (idle): "MainThread"
    epoll_wait (libc.so.6)
    select (selectors.py:468)
Thread 16373 (active+gil): "decode_0"
    spin (<string>:6)
Thread 16374 (idle): "decode_1"
    pthread_cond_timedwait (libc.so.6)
    take_gil (libpython3.11.so.1.0)
    PyEval_RestoreThread (libpython3.11.so.1.0)
    imdecode (cv2.abi3.so)
Thread 16375 (active): "depth-decode_3"
    isal_inflate (isal_zlib.so)
Thread 0x7F00 (idle)
    futex_wait (libc.so.6)
"""


def test_thread_states_reads_each_threads_state_from_a_dump() -> None:
    assert thread_states.parse_dump(DUMP) == [("main thread", "sleeps"), ("decode", "holds the GIL"),
                                              ("decode", "waits for the GIL"),
                                              ("depth-decode", "runs without the GIL"), ("0x7F00", "sleeps")]


_GIL_CONTENTION = ("import threading, time, numpy as np\n"
                   "a = np.zeros(5_000_000)\n"
                   "def spin():\n    while True: pass\n"
                   "def copier():\n    while True: a.copy()\n"
                   "threading.Thread(target=spin, name='spinner', daemon=True).start()\n"
                   "threading.Thread(target=copier, name='copier', daemon=True).start()\n"
                   "print('up', flush=True)\ntime.sleep(60)\n")


@contextmanager
def _gil_contention() -> Iterator[int]:
    """A real process (its pid): one thread runs Python without pause, one copies a large array (numpy gives
    the GIL up for it) in a loop and so keeps waiting to take it back."""
    proc = subprocess.Popen([sys.executable, "-c", _GIL_CONTENTION], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not thread_states.available(), reason="py-spy is not installed")
def test_thread_states_sees_a_thread_wait_for_the_gil_that_another_holds(tmp_path: Path) -> None:
    """_gil_contention's copier keeps waiting for the GIL that its spinner holds."""
    with _gil_contention() as pid:
        sampler = thread_states.StateSampler({"test": [pid]}, interval=0.05)
        sampler.start()
        deadline = time.monotonic() + 60
        while sampler.dumps < 12 and time.monotonic() < deadline:
            time.sleep(0.1)
        states = sampler.stop()
    if not states:
        pytest.skip("py-spy cannot read another process here (ptrace not permitted)")
    # one thread of each name: the average count of it in a state is the share of dumps in it
    assert all(abs(sum(per.values()) - 1) < 0.02 for per in states.values()), states
    assert states["test: spinner"]["holds the GIL"] > 0.5, states
    assert states["test: copier"]["holds the GIL"] + states["test: copier"]["sleeps"] < 0.9, states
    assert states["test: copier"]["waits for the GIL"] + states["test: copier"]["runs without the GIL"] > 0.1, states
    assert states["test: main thread"]["sleeps"] > 0.9, states


RAW = """thread (0x1): decode_2;0x7f (libc.so.6);_bootstrap (threading.py:1002);_worker (thread.py:89);\
decode_into_slot (/srv/dd/frontend/decode.py:468);wait (threading.py:355);PyThread_acquire_lock_timed (python3.12) 30
thread (0x2): decode_3;_worker (thread.py:89);decode_into_slot (/srv/dd/frontend/decode.py:479);\
_imdecode (/srv/dd/frontend/decode.py:579);cv::imdecode (cv2.abi3.so);0x7e (libc.so.6);\
pthread_cond_timedwait (libc.so.6) 10
thread (0x3): MainThread;run_frontend (/srv/dd/frontend/server.py:228);select (selectors.py:468);\
epoll_wait (libc.so.6) 50
thread (0x4): Thread-1 (_poll_wrapper);run (threading.py:1010) 5
"""


def test_thread_stacks_names_each_threads_places_and_its_gil_waits() -> None:
    where = thread_stacks.summarize(RAW)  # a backslash at a line's end continues it: one line per stack
    assert set(where) == {"decode", "main thread", "Thread"}
    decode = where["decode"]
    assert decode["samples"] == 40 and decode["gil_wait"] == 0.25
    assert decode["where"] == [
        ("decode_into_slot (decode.py:468) > wait (threading.py:355) > PyThread_acquire_lock_timed", 0.75),
        ("_imdecode (decode.py:579) > cv::imdecode > pthread_cond_timedwait", 0.25)]
    assert where["main thread"]["where"] == [
        ("run_frontend (server.py:228) > select (selectors.py:468) > epoll_wait", 1.0)]


@pytest.mark.skipif(not thread_stacks.available(), reason="py-spy is not installed")
def test_thread_stacks_sees_a_thread_wait_for_the_gil_that_another_holds() -> None:
    """As for thread_states: _gil_contention's copier gives the GIL up for each copy and waits to take it
    back from the spinner, which never blocks."""
    with _gil_contention() as pid:
        where = thread_stacks.Recording(pid, seconds=2, rate=50).result()
    if not where:
        pytest.skip("py-spy cannot read another process here (ptrace not permitted)")
    assert where["copier"]["gil_wait"] > 0.1, where
    assert where["spinner"]["gil_wait"] < where["copier"]["gil_wait"], where
    assert where["main thread"]["gil_wait"] < 0.2 and where["main thread"]["samples"] > 20, where


def test_cpu_delta_reports_each_frontend_apart_and_counts_it_once() -> None:
    """Each frontend's CPU apart (how the kernel spread the connections), kept out of the per-role totals: a
    first version summed the busiest and the idlest into the server's CPU per image as well."""
    before = {"frontend": 1.0, "frontend#11": 0.5, "frontend#12": 0.5, "worker": 2.0, "client": 0.0}
    after = {"frontend": 4.0, "frontend#11": 3.0, "frontend#12": 1.0, "worker": 3.0, "client": 1.0}
    out = bench_requests.cpu_delta(before, after, answered=100, wall_s=2.0)
    assert out["cpu_ms_per_image"] == {"frontend": 30.0, "worker": 10.0, "client": 10.0}
    assert out["cores_busy"] == {"frontend": 1.5, "worker": 0.5, "client": 0.5}
    assert out["frontend_processes"] == {"busiest_ms_per_image": 25.0, "idlest_ms_per_image": 5.0,
                                         "cores_each": [0.25, 1.25]}


def test_bench_idle_gaps_times_the_decode_after_each_kind_of_gap(tmp_path: Path) -> None:
    """Its CPU part (--no-engine: the engine rows, the GPU kernels and the clocks need a GPU): one median per
    kind of gap for the frontend's decode, in the table and the JSON."""
    out = _run([str(SCRIPTS / "bench_idle_gaps.py"), "--no-engine", "--calls", "3", "--rounds", "1", "--gap-ms", "2",
                "--json", str(tmp_path / "idle.json")], timeout=240)
    summary = json.loads((tmp_path / "idle.json").read_text())
    (decode,) = summary.values()
    assert list(decode) == ["back to back", "after 2 ms idle", "after 2 ms spinning"]
    assert all(ms > 0 for ms in decode.values())
    assert "| frontend decode (client library's JPEG + PNG, as rows) |" in out


def test_bench_input_graphs_reads_the_gpus_busy_and_idle_time_per_call(tmp_path: Path) -> None:
    """Its trace reading (the timing needs a GPU): kernels are given to the call whose range holds their
    launch, and each call's busy time, span and idle time within the span come out as medians per mode."""
    import bench_input_graphs

    def kernel(corr: int, ts: float, dur: float) -> list[dict]:
        return [{"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ph": "X", "ts": ts - 5, "dur": 2,
                 "args": {"correlation": corr}},
                {"cat": "kernel", "name": "k", "ph": "X", "ts": ts, "dur": dur, "args": {"correlation": corr}}]

    events = [{"cat": "user_annotation", "name": "call|a|0", "ph": "X", "ts": 0, "dur": 100},
              {"cat": "user_annotation", "name": "call|b|0", "ph": "X", "ts": 200, "dur": 100},
              *kernel(1, 10, 20), *kernel(2, 50, 10),  # a: busy 30 of a 50 us span
              *kernel(3, 210, 40), {"cat": "cpu_op", "name": "aten::add", "ph": "X", "ts": 220, "dur": 3}]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    got = bench_input_graphs.kernel_spans(trace, "call|")
    assert got == {"a": {"kernels": 2, "GPU busy us": 30, "span us": 50, "GPU idle in span us": 20},
                   "b": {"kernels": 1, "GPU busy us": 40, "span us": 40, "GPU idle in span us": 0}}


def test_bench_grpc_transport_prints_each_sets_p50_and_the_servers_cpu(tmp_path: Path) -> None:
    """The bare gRPC server's CPU per call is the floor the frontend's "rest" is read against."""
    out_json = tmp_path / "t.json"
    skip = [name for name in __import__("bench_grpc_transport").SETS
            if name not in ("defaults", "Detector protobufs, the frontend's allocator")]
    out = _run(["scripts/bench_grpc_transport.py", "--calls", "5", "--rounds", "1", "--request-bytes", "20000",
                "--response-bytes", "5000", "--json", str(out_json), "--skip", *skip], timeout=180)
    got = json.loads(out_json.read_text())
    assert set(got) == {"standard, defaults", "standard, Detector protobufs, the frontend's allocator",
                        "1 KB each way, defaults"}, out
    for key, rounds in got.items():
        assert rounds["round 1"]["p50_ms"] > 0 and rounds["round 1"]["server_cpu_ms"] >= 0, (key, out)


def test_floor_cpu_ms_serves_the_requests_from_a_bare_server_and_stops_it() -> None:
    import numpy as np
    import psutil

    from dd.client import make_request

    reqs = [make_request(np.zeros((48, 64, 3), np.uint8), np.zeros((48, 64), np.uint16), encoding="raw")]
    def servers() -> set[int]:  # multiprocessing's resource tracker, started once, is no server
        return {p.pid for p in psutil.Process().children() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                and "resource_tracker" not in " ".join(p.cmdline())}

    before = servers()
    cpu = bench_frontend_cpu.floor_cpu_ms(reqs, 2000, calls=5)  # raises if a call fails
    assert cpu >= 0.0  # five tiny calls may cost less than the CPU clock's tick: 0 is a fair reading
    assert not servers() - before


def test_bench_loop_socket_times_both_ways() -> None:
    out = _run(["scripts/bench_loop_socket.py", "--round-trips", "20", "--rounds", "1"], timeout=120)
    rows = {line.split("|")[1].strip(): float(line.split("|")[2].split()[0])
            for line in out.splitlines() if line.startswith("| ") and "way" not in line}
    assert set(rows) == {"zmq.asyncio", "LoopSocket"} and all(v > 0 for v in rows.values()), out
