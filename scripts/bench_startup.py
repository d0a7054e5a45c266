#!/usr/bin/env python3
"""Start-up and recovery: `deep-detection serve` start to SERVING, cold and warm; a killed worker back.

For each model folder (the demo RGB-D model and an R50-FPN random folder like
bench_serve's, both on the engine you name):

- cold: the caches a start fills (TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR,
  CUDA_CACHE_PATH, XDG_CACHE_HOME) pointed at a fresh empty folder, then the
  time from starting `deep-detection serve` to grpc.health saying SERVING;
- warm: a second start with those caches kept.

Then, on the warm R50 server under load (closed loop, `--kill-concurrency`
requests in flight), its worker is killed (SIGKILL) and the script measures
the time from the kill to the first OK answer to a request sent after the kill
(only the new worker can have served it), and how long the requests that were
in flight or sent meanwhile waited (and how many failed, by status).

The server's log lines give the phases where they exist (engine load: weights,
fusing, warm-up and graph captures; each capture; the restart delay).
`--out DIR` writes startup.json, startup.md and the servers' logs.

    python scripts/bench_startup.py --engine fast --out $OUT/startup          # GPU, about 2-3 minutes
    python scripts/bench_startup.py --engine torchvision --arch small --device cpu --out /tmp/s   # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_requests import REPO, Served, log_events, requests_of, scenes, slot_mb, stop_on_sigterm  # noqa: E402
from bench_serve import make_model  # noqa: E402

CACHE_VARS = ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "CUDA_CACHE_PATH", "XDG_CACHE_HOME")


def demo_folder(root: Path, engine: str, height: int, width: int, batch: int,
                fast_options: dict | None = None) -> Path:
    """The demo RGB-D model, copied, on the engine asked for (warm-up at the bench's frame size)."""
    dest = root / "demo-rgbd"
    shutil.copytree(REPO / "configs" / "models" / "demo-rgbd", dest)
    cfg_path = dest / "node_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update({"ENGINE": engine, "MAX_BATCH_SIZE": batch,
                "ENGINE_OPTIONS": ({"warmup_sizes": [[height, width]], "allow_cpu": True, **(fast_options or {})}
                                   if engine == "fast" else {})})
    cfg_path.write_text(json.dumps(cfg, indent=1))
    return dest


def cache_env(base: dict[str, str], cache: Path) -> dict[str, str]:
    return dict(base, **{var: str(cache / var.lower()) for var in CACHE_VARS})


def phases(events: list[dict]) -> dict:
    """The log's start-up numbers, by name (seconds)."""
    out: dict = {}
    for e in events:
        g = e["groups"]
        if e["kind"] == "engine_load":
            out.setdefault("engine_load", []).append(
                {"total_s": float(g[0]), "weights_and_model_s": float(g[1]), "fusing_and_kernels_s": float(g[2]),
                 "warmup_and_captures_s": float(g[3]), "at_s": e["at_s"]})
        elif e["kind"] == "worker_loaded":
            out.setdefault("worker_loaded", []).append({"worker": g[0], "engine": g[1], "load_s": float(g[2]),
                                                        "at_s": e["at_s"]})
        elif e["kind"] == "capture_at_load":
            out.setdefault("captures_at_load", []).append({"what": g[0], "s": float(g[1]), "warmup_runs_s": float(g[2])})
        elif e["kind"] == "capture_while_serving":
            out.setdefault("captures_while_serving", []).append({"what": g[0], "s": float(g[1])})
        elif e["kind"] == "restart":
            out.setdefault("restarts", []).append({"child": g[0], "exit": g[2], "ran_s": float(g[3]),
                                                   "delay_s": float(g[4]), "at_s": e["at_s"]})
        elif e["kind"] in ("started", "serving", "worker_listening", "ready_at_frontend"):
            out.setdefault(e["kind"], []).append({"what": g[0], "at_s": e["at_s"]})
        elif e["kind"] == "compressed_warmup":
            out.setdefault("compressed_warmup", []).append({"jpeg": g[0] == "yes", "png_rows": g[1] == "yes",
                                                            "s": float(g[2])})
        elif e["kind"] == "rings_prepared":
            out.setdefault("rings_prepared", []).append({"worker": g[0], "rings": int(g[1]), "s": float(g[2]),
                                                         "at_s": e["at_s"]})
        elif e["kind"] == "zygote_started":
            out.setdefault("zygote", {})["started_at_s"] = e["at_s"]
        elif e["kind"] == "zygote_ready":
            out.setdefault("zygote", {}).update(imports_s=float(g[0]), ready_at_s=e["at_s"])
    return out


def start_once(folder: Path, out_dir: Path, name: str, env: dict[str, str], frontends: int, slot: int,
               timeout: float, extra_args: list[str] | None = None) -> tuple[Served, dict]:
    server = Served(folder, Path(tempfile.mkdtemp(prefix="ddstart-", dir="/tmp")) / "run", out_dir / f"{name}.log",
                    frontends, env, slot_mb=slot, ring_slots=16, extra_args=list(extra_args or []))
    server.start()
    try:
        took = server.wait_serving(timeout, poll_s=0.05)
    except BaseException:
        server.stop()
        raise
    return server, {"start_to_serving_s": round(took, 3),
                    "phases": phases(log_events(server.log(), server.started_wall))}


class RecordingLoad:
    """A closed-loop load in a thread of its own, recording each request: sent, done, OK or its status."""

    def __init__(self, target: str, requests: list[bytes], concurrency: int) -> None:
        self.target, self.requests, self.concurrency = target, requests, concurrency
        self.records: list[tuple[float, float, str]] = []  # (sent, done) perf_counter, "OK" or the status
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> "RecordingLoad":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)

    async def _run(self) -> None:
        from dd.client import AsyncDetectorClient
        from dd.proto.deep_detection.v1 import detector_pb2 as pb

        reqs = [pb.DetectRequest.FromString(r) for r in self.requests]
        async with AsyncDetectorClient(self.target, timeout=120) as client:
            async def worker(w: int) -> None:
                k = w
                while not self._stop.is_set():
                    t0 = time.perf_counter()
                    try:
                        await client.detect_request(reqs[k % len(reqs)])
                        status = "OK"
                    except Exception as exc:  # noqa: BLE001 - recorded
                        status = exc.code().name if hasattr(exc, "code") else type(exc).__name__
                    self.records.append((t0, time.perf_counter(), status))
                    if status != "OK":
                        await asyncio.sleep(0.01)  # no busy loop while no worker is there
                    k += self.concurrency

            await asyncio.gather(*(worker(w) for w in range(self.concurrency)))


def kill_under_load(server: Served, requests: list[bytes], concurrency: int, before_s: float, after_s: float,
                    timeout: float) -> dict:
    """SIGKILL the server's (first) worker under load; time until a request sent after the kill is answered."""
    load = RecordingLoad(server.target, requests, concurrency).start()
    try:
        time.sleep(before_s)
        workers = server.pids("worker")
        if not workers:
            return {"error": "no worker process found"}
        os.kill(workers[0], signal.SIGKILL)
        t_kill = time.perf_counter()
        kill_wall = time.time()
        recovered = None
        end = t_kill + timeout
        while recovered is None and time.perf_counter() < end:
            time.sleep(0.05)
            done = [r for r in list(load.records) if r[0] >= t_kill and r[2] == "OK"]
            if done:
                recovered = min(r[1] for r in done)
        if recovered is not None:
            time.sleep(after_s)
    finally:
        load.stop()
    recs = load.records
    before = [r for r in recs if r[1] < t_kill and r[2] == "OK" and r[0] >= t_kill - before_s + 1.0]
    # The requests the GPU's outage touched: in flight at the kill, or sent before the first answer after it.
    touched = [r for r in recs if r[1] >= t_kill and (recovered is None or r[0] <= recovered)]
    ok = [(r[1] - r[0]) * 1e3 for r in touched if r[2] == "OK"]
    codes: dict[str, int] = {}
    for r in touched:
        if r[2] != "OK":
            codes[r[2]] = codes.get(r[2], 0) + 1
    after = [r for r in recs if recovered is not None and r[0] > recovered and r[2] == "OK"]
    events = phases(log_events(server.log(), kill_wall))
    new_loads = [w for w in events.get("worker_loaded", []) if w["at_s"] is not None and w["at_s"] > 0]
    restarts = [r for r in events.get("restarts", []) if r["at_s"] is not None and r["at_s"] > -1]
    return {
        "killed_pid": workers[0], "concurrency": concurrency,
        "recovered_s": None if recovered is None else round(recovered - t_kill, 3),
        "recovered_within_timeout": recovered is not None, "timeout_s": timeout,
        "touched_requests": len(touched), "touched_ok": len(ok), "touched_errors_by_code": codes,
        "touched_ok_wait_ms": {"p50": float(np.percentile(ok, 50)), "max": float(np.max(ok))} if ok else None,
        "images_per_s_before": round(len(before) / max(before_s - 1.0, 1e-9), 1),
        "p50_ms_after": float(np.percentile([(r[1] - r[0]) * 1e3 for r in after], 50)) if after else None,
        "restart_delay_s": restarts[0]["delay_s"] if restarts else None,
        "new_worker_load_s": new_loads[0]["load_s"] if new_loads else None,
        "new_worker_loaded_at_s": new_loads[0]["at_s"] if new_loads else None,
        "phases_after_kill": events,
    }


def table(results: dict) -> list[str]:
    a = results.get("args", {})
    lines = [f"## Start-up and recovery, {a.get('engine')} engine, device {a.get('device')}, "
             f"{results.get('cores')} cores, {results.get('started', '')}", "",
             "| model | start | start to SERVING s | worker's engine load s | of it: weights and model | fusing and "
             "kernels | warm-up and graph captures | captures at load (s each) |",
             "|---|---|---|---|---|---|---|---|"]
    for model, runs in results.get("models", {}).items():
        for start, r in runs.items():
            if "error" in r:
                lines.append(f"| {model} | {start} | failed: {r['error'][:200]} | | | | | |")
                continue
            ph = r.get("phases", {})
            load = ph.get("worker_loaded", [{}])[0].get("load_s", "")
            eng = ph.get("engine_load", [{}])[0]
            caps = ", ".join(f"{c['s']:.1f}" for c in ph.get("captures_at_load", []))
            lines.append(f"| {model} | {start} | **{r['start_to_serving_s']:.1f}** | {load} | "
                         f"{eng.get('weights_and_model_s', '')} | {eng.get('fusing_and_kernels_s', '')} | "
                         f"{eng.get('warmup_and_captures_s', '')} | {caps} |")
    k = results.get("kill")
    if k:
        lines += ["", "| worker killed under load | value |", "|---|---|"]
        if "error" in k:
            lines.append(f"| failed | {k['error'][:300]} |")
        else:
            wait = k.get("touched_ok_wait_ms") or {}
            rows = [("model", k.get("model")), ("concurrency", k["concurrency"]),
                    ("kill to the first OK answer sent after it, s",
                     f"**{k['recovered_s']}**" if k["recovered_s"] is not None else f"none in {k['timeout_s']} s"),
                    ("supervisor's restart delay, s", k.get("restart_delay_s")),
                    ("new worker's engine load, s", k.get("new_worker_load_s")),
                    ("requests in flight or sent until then", k["touched_requests"]),
                    ("of them answered OK; their wait p50 / max, ms",
                     f"{k['touched_ok']}; {_f(wait.get('p50'))} / {_f(wait.get('max'))}"),
                    ("of them failed, by status", k["touched_errors_by_code"] or "none"),
                    ("images/s before the kill", k["images_per_s_before"]),
                    ("p50 ms after recovery", _f(k.get("p50_ms_after")))]
            lines += [f"| {name} | {value} |" for name, value in rows]
    lines += ["", "Cold: TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR, CUDA_CACHE_PATH and XDG_CACHE_HOME in a fresh "
              "empty folder; warm: the second start with them kept. Phases from the server's log lines where it "
              "writes them."]
    return lines


def _f(x: float | None) -> str:
    return "" if x is None else f"{x:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", default="fast", help="fast (GPU), torchvision or null")
    ap.add_argument("--arch", default="r50", choices=["r50", "small"], help="the random folder's network")
    ap.add_argument("--device", default="cuda:0", help="cuda:N serves on that GPU alone; cpu on the CPU")
    ap.add_argument("--models", nargs="+", default=["demo", "r50"], choices=["demo", "r50"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--min-size", type=int, default=800)
    ap.add_argument("--detections", type=int, default=100)
    ap.add_argument("--frontends", type=int, default=4)
    ap.add_argument("--no-kill", action="store_true", help="leave out the worker kill")
    ap.add_argument("--kill-concurrency", type=int, default=4)
    ap.add_argument("--kill-before", type=float, default=3.0, help="seconds of load before the kill")
    ap.add_argument("--kill-after", type=float, default=2.0, help="seconds of load after recovery")
    ap.add_argument("--timeout", type=float, default=180.0, help="per start, and for recovery")
    ap.add_argument("--fast-options", default="{}", help="more ENGINE_OPTIONS for the fast engine, as JSON")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="also start each model with these serve flags (space-separated; caches of their own), "
                         "e.g. 'nopre=--no-preload-kernels'")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    stop_on_sigterm()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="ddstartup-", dir="/tmp"))
    results: dict = {"args": vars(args), "cores": os.cpu_count(),
                     "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "models": {}}

    def save() -> None:
        (out / "startup.json").write_text(json.dumps(results, indent=1, default=str))
        (out / "startup.md").write_text("\n".join(table(results)) + "\n")

    gpu = args.device.split(":")[1] if args.device.startswith("cuda") else ""
    base_env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu) if gpu else dict(os.environ)
    if args.device == "cpu":
        base_env["CUDA_VISIBLE_DEVICES"] = ""
    slot = slot_mb(args.height, args.width)
    folders = {}
    fast = json.loads(args.fast_options)
    for name in args.models:
        folders[name] = (demo_folder(tmp, args.engine, args.height, args.width, args.batch, fast) if name == "demo" else
                         make_model(tmp, args.engine, args.arch, args.batch, args.height, args.width, args.detections,
                                    args.min_size, fast_options=fast))
    kill_model = "r50" if "r50" in folders else args.models[-1]
    labels = {"demo": "demo-rgbd", "r50": f"random {args.arch} ({args.detections} detections)"}
    variants = [("", [])] + [(v.partition("=")[0], v.partition("=")[2].split()) for v in args.variant]
    for (name, folder), (variant, extra) in [(f, v) for f in folders.items() for v in variants]:
        env = cache_env(base_env, tmp / f"cache-{name}-{variant}")
        label = labels[name] + (f", {variant} ({' '.join(extra)})" if variant else "")
        results["models"][label] = {}
        for start in ("cold", "warm"):
            try:
                server, res = start_once(folder, out, f"{name}{variant}_{start}", env, args.frontends, slot,
                                         args.timeout, extra)
            except Exception as exc:  # noqa: BLE001 - reported in the table; the other starts go on
                results["models"][label][start] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"{name} {start}: failed: {exc}", flush=True)
                save()
                continue
            results["models"][label][start] = res
            print(f"{name} {start}: start to SERVING {res['start_to_serving_s']:.2f} s; phases {res['phases']}",
                  flush=True)
            save()
            try:
                if start == "warm" and name == kill_model and not variant and not args.no_kill:
                    frames = scenes(4, args.height, args.width)
                    results["kill"] = {"model": label, **kill_under_load(
                        server, requests_of("jpeg+png", frames), args.kill_concurrency, args.kill_before,
                        args.kill_after, args.timeout)}
                    print(f"kill: {json.dumps({k: v for k, v in results['kill'].items() if k != 'phases_after_kill'})}",
                          flush=True)
                    save()
            finally:
                server.stop()
    lines = table(results)
    print("\n" + "\n".join(lines), flush=True)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
