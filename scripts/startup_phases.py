#!/usr/bin/env python3
"""Start to SERVING, and where the time goes, for one or more checkouts of this repository, interleaved.

Each run starts `deep-detection serve MODEL` (importing the checkout's own `dd`: it runs in that
folder with it first on PYTHONPATH), asks grpc.health every 10 ms on a fresh channel (a reused channel
would wait out gRPC's reconnect backoff) until it says SERVING, stops the server, and reads the
times of its log lines: the phases below, in seconds after `serve` was started. Runs of the checkouts
alternate (A B A B ...) so that a busy machine hurts each alike; medians are printed.

    python scripts/startup_phases.py --model /tmp/m/null --runs 7 --checkout before=/tmp/old --checkout after=.
    # a GPU host, the benchmarks' R50-FPN RGB-D folder on the fast engine, four frontends of 128 MiB rings:
    python scripts/startup_phases.py --bench-model r50 --frontends 4 --slot-mb 8 --ring-slots 16 --runs 5 \
        --checkout before=/tmp/old --checkout after=.

The gaps it prints are the waits that are not work: `discover` (a worker's socket bound -> a frontend
found it), `ready` (the worker loaded its engine -> a frontend heard it), `serving` (-> health said
so), `first_spawn` (serve started -> its first child started). Phases missing from an older
checkout's log (the zygote's lines) are left out for it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_requests import free_port, health_status, log_events  # noqa: E402

# phase name -> (event kind, the role that logs it, None for any)
PHASES = {
    "zygote_started": ("zygote_started", None), "first_frontend_started": ("started", "frontend"),
    "zygote_ready": ("zygote_ready", None), "worker_started": ("started", "worker"),
    "worker_listening": ("worker_listening", None), "worker_loaded": ("worker_loaded", None),
    "found_worker": ("found_worker", None), "rings_prepared": ("rings_prepared", None),
    "ready_at_frontend": ("ready_at_frontend", None),
}
GAPS = {"first_spawn": (None, "first_child_started"), "discover": ("worker_listening", "found_worker"),
        "ready": ("worker_loaded", "ready_at_frontend"), "serving": ("ready_at_frontend", "serving")}


def one_run(checkout: Path, model: Path, frontends: int, timeout: float, log_path: Path,
            slot_mb: float = 4, ring_slots: int = 8) -> dict:
    port = free_port()
    run_dir = Path(tempfile.mkdtemp(prefix="ddphase-", dir="/tmp")) / "run"
    argv = [sys.executable, "-m", "dd", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--frontends", str(frontends), "--run-dir", str(run_dir), "--metrics-port", "0",
            "--slot-mb", str(slot_mb), "--ring-slots", str(ring_slots)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")])))
    with open(log_path, "wb") as log:
        wall, t0 = time.time(), time.perf_counter()
        proc = subprocess.Popen(argv, cwd=checkout, stdout=log, stderr=subprocess.STDOUT, env=env)
        serving = None
        try:
            while time.perf_counter() - t0 < timeout and proc.poll() is None:
                if health_status(f"127.0.0.1:{port}", timeout=0.5) == 1:
                    serving = time.perf_counter() - t0
                    break
                time.sleep(0.01)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    text = log_path.read_text(errors="replace")
    out: dict = {"serving": serving}
    events = log_events(text, wall)
    for name, (kind, role) in PHASES.items():
        hit = next((e for e in events if e["kind"] == kind and (role is None or e["groups"][0].startswith(role))),
                   None)
        if hit is not None:
            out[name] = hit["at_s"]
    started = [e["at_s"] for e in events if e["kind"] in ("started", "zygote_started")]
    if started:
        out["first_child_started"] = min(started)
    return out


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=Path, help="a model folder or repository to serve")
    which.add_argument("--bench-model", choices=["r50", "small"],
                       help="the benchmarks' random RGB-D folder (bench_serve.make_model: MAX_BATCH_SIZE 8, "
                            "warm-up 1280x720, 100 detections), made in a temporary folder")
    ap.add_argument("--engine", default="fast", help="--bench-model's engine (fast on a GPU; torchvision, null)")
    ap.add_argument("--slot-mb", type=float, default=4)
    ap.add_argument("--ring-slots", type=int, default=8)
    ap.add_argument("--checkout", action="append", required=True, help="NAME=PATH of a checkout (repeat)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--frontends", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=180.0)
    ap.add_argument("--out", type=Path, help="folder for startup_phases.json and the servers' logs")
    args = ap.parse_args()
    checkouts = dict(c.split("=", 1) for c in args.checkout)
    model = args.model
    if model is None:
        from bench_serve import make_model

        model = make_model(Path(tempfile.mkdtemp(prefix="startup-phases-model-")), args.engine, args.bench_model,
                           8, 720, 1280, 100, 800)
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="startup-phases-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {name: [] for name in checkouts}
    for i in range(args.runs):
        for name, path in checkouts.items():
            r = one_run(Path(path).resolve(), model.resolve(), args.frontends, args.timeout,
                        out_dir / f"{name}-{i}.log", args.slot_mb, args.ring_slots)
            runs[name].append(r)
            print(name, json.dumps(r), flush=True)
    summary = {}
    for name, rs in runs.items():
        keys = ["serving", "first_child_started", *PHASES]
        med = {k: median([r[k] for r in rs if r.get(k) is not None]) for k in keys}
        gaps = {}
        for g, (a, b) in GAPS.items():
            gaps[g] = median([r[b] - (0.0 if a is None else r[a]) for r in rs
                              if r.get(b) is not None and (a is None or r.get(a) is not None)])
        summary[name] = {"median_s": med, "gap_median_s": gaps, "runs": len(rs),
                         "failed": sum(r["serving"] is None for r in rs)}
    (out_dir / "startup_phases.json").write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))
    names = list(summary)
    print("\n| median, s (" + f"{args.runs} runs each, interleaved) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for k in summary[names[0]]["median_s"]:
        print(f"| {k} | " + " | ".join(str(summary[n]["median_s"][k]) for n in names) + " |")
    for k in GAPS:
        print(f"| gap: {k} | " + " | ".join(str(summary[n]["gap_median_s"][k]) for n in names) + " |")
    print(f"\nwritten to {out_dir}")
    return 0 if all(s["failed"] == 0 for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
