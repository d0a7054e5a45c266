#!/usr/bin/env python3
"""Mixed input sizes: RGB-D requests of several sizes at once, against a model warmed up at one size.

Serves an R50-FPN random folder (like bench_serve's) warmed up at `--warmup`
only, then sends frames of every `--sizes` mixed (each in-flight request takes
the next size in turn) at `--concurrency` for `--seconds`, and reports per size
the p50, p99 and slowest latency, and how many graph captures the server did
while serving (its log: "captured the network for ..." after SERVING).

The fast engine keys its graphs by padded network input (canvas), not by input
size: warmed up at 1280x720 with shorter side 800, it captures 768x1344 at load
and the largest canvases, 800x1344 and 1344x800, in the background right after
SERVING (counted below as captures while serving), or at load with
`--max-canvases-at-load`; 640x480 then runs on 800x1344, 1920x1080 on 768x1344.

Issue #18's goal: no capture while serving, and each size's slowest request
<= 3 x its p50. `--out DIR` writes mixed.json, mixed.md, mixed.png (latency
over time per size; matplotlib, the `bench` extra) and the server's log.

    python scripts/bench_mixed_sizes.py --engine fast --seconds 40 --out $OUT/mixed        # GPU
    python scripts/bench_mixed_sizes.py --engine fast --max-canvases-at-load --seconds 40 --out $OUT/mixed-atload
    python scripts/bench_mixed_sizes.py --engine torchvision --arch small --device cpu \\
        --sizes 320x240 480x360 --warmup 320x240 --seconds 2 --out /tmp/m                  # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_requests import KINDS, Served, log_events, requests_of, scenes, slot_mb, stop_on_sigterm  # noqa: E402
from bench_serve import make_model  # noqa: E402


def size(text: str) -> tuple[int, int]:
    """'1280x720' -> (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is WIDTHxHEIGHT, e.g. 1280x720, not {text!r}") from None
    return w, h


async def mixed_load(target: str, by_size: dict[str, list[bytes]], concurrency: int, seconds: float,
                     t0: float) -> list[tuple[str, float, float, str]]:
    """Closed loop; request k of in-flight slot w takes size (w + k) mod the number of sizes. Records
    (size, sent in seconds after t0, latency ms, "OK" or the status)."""
    from dd.client import AsyncDetectorClient
    from dd.proto.deep_detection.v1 import detector_pb2 as pb

    names = list(by_size)
    reqs = {name: [pb.DetectRequest.FromString(r) for r in rs] for name, rs in by_size.items()}
    records: list[tuple[str, float, float, str, float | None]] = []
    async with AsyncDetectorClient(target, timeout=120) as client:
        # The channel connected first, as a long-lived client's is: its set-up is not the server's first
        # requests' cost (nothing model-related runs for a ListModels call).
        await client.list_models()
        stop_at = time.perf_counter() + seconds
        async def worker(w: int) -> None:
            k = 0
            while time.perf_counter() < stop_at:
                name = names[(w + k) % len(names)]
                frames = reqs[name]
                sent = time.perf_counter()
                server_ms = None
                try:
                    result = await client.detect_request(frames[(k // len(names)) % len(frames)])
                    server_ms = result.timing["total_us"] / 1e3
                    status = "OK"
                except Exception as exc:  # noqa: BLE001 - recorded
                    status = exc.code().name if hasattr(exc, "code") else type(exc).__name__
                    await asyncio.sleep(0.01)
                records.append((name, sent - t0, (time.perf_counter() - sent) * 1e3, status, server_ms))
                k += 1

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return records


def per_size(records: list[tuple], names: list[str], factor: float) -> dict:
    """Per size from records (size, sent s, latency ms, status[, the server's total ms])."""
    out = {}
    for name in names:
        lat = [r[2] for r in records if r[0] == name and r[3] == "OK"]
        errors: dict[str, int] = {}
        for r in records:
            if r[0] == name and r[3] != "OK":
                errors[r[3]] = errors.get(r[3], 0) + 1
        if not lat:
            out[name] = {"n": 0, "errors_by_code": errors, "met": False}
            continue
        p50 = float(np.percentile(lat, 50))
        worst = float(np.max(lat))
        server = [r[4] for r in records if r[0] == name and r[3] == "OK" and len(r) > 4 and r[4] is not None]
        out[name] = {"n": len(lat), "p50_ms": p50, "p99_ms": float(np.percentile(lat, 99)), "max_ms": worst,
                     "max_over_p50": worst / p50, "met": worst <= factor * p50 and not errors,
                     "errors_by_code": errors,
                     # the server's own total (its Timing): what the client's channel and the transport add is not in it
                     "server_p50_ms": float(np.percentile(server, 50)) if server else None,
                     "server_max_ms": float(np.max(server)) if server else None}
    return out


def table(results: dict) -> list[str]:
    a = results.get("args", {})
    lines = [f"## Mixed sizes, RGB-D {a.get('encoding')}, {a.get('arch')} {a.get('engine')} engine warmed up at "
             f"{a.get('warmup')}, concurrency {a.get('concurrency')} for {a.get('seconds')} s, device "
             f"{a.get('device')}, {results.get('cores')} cores, {results.get('started', '')}", "",
             f"| size | requests | p50 ms | p99 ms | slowest ms | slowest / p50 | <= {a.get('factor')} x p50 | errors "
             "| server total p50 / slowest ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.get("sizes", {}).items():
        if not r.get("n"):
            lines.append(f"| {name} | 0 | | | | | no | {r.get('errors_by_code')} | |")
            continue
        lines.append(f"| {name} | {r['n']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} | "
                     f"{r['max_over_p50']:.2f} | {'yes' if r['met'] else '**no**'} | "
                     f"{sum(r['errors_by_code'].values()) or ''} | "
                     + (f"{r['server_p50_ms']:.1f} / {r['server_max_ms']:.1f} |" if r.get("server_max_ms") else "- |"))
    caps = results.get("captures_while_serving")
    if caps is not None:
        lines += ["", f"Graph captures while serving (the server's log after SERVING): **{len(caps)}**"
                  + "".join(f"\n- {c}" for c in caps)]
        lines.append(f"\nGoal (issue #18: no capture while serving, each size's slowest <= {a.get('factor')} x its "
                     f"p50): **{'met' if results.get('goal_met') else 'not met'}**")
    if "start_to_serving_s" in results:
        lines.append(f"\nStart to SERVING: {results['start_to_serving_s']} s.")
    return lines


def picture(results: dict, records: list, out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("no picture: matplotlib is missing (pip install -e '.[bench]')", flush=True)
        return None
    fig, ax = plt.subplots(figsize=(9, 4))
    for name in results["sizes"]:
        pts = [(r[1], r[2]) for r in records if r[0] == name and r[3] == "OK"]
        if pts:
            ax.scatter(*zip(*pts), s=4, label=name)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("request sent, seconds after the load began (right after SERVING)")
    ax.set_ylabel("latency, ms")
    ax.set_title(f"Mixed sizes at concurrency {results['args']['concurrency']} "
                 f"({results['args']['engine']}, warm-up {results['args']['warmup']})")
    ax.grid(alpha=0.3)
    ax.legend(markerscale=4)
    fig.tight_layout()
    path = out / "mixed.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", default="fast", help="fast (GPU), torchvision or null")
    ap.add_argument("--arch", default="r50", choices=["r50", "small"])
    ap.add_argument("--device", default="cuda:0", help="cuda:N serves on that GPU alone; cpu on the CPU")
    ap.add_argument("--sizes", type=size, nargs="+", default=[(640, 480), (1280, 720), (1920, 1080)],
                    help="WIDTHxHEIGHT of the requests, mixed")
    ap.add_argument("--warmup", type=size, default=(1280, 720), help="the only size captured at load")
    ap.add_argument("--max-canvases-at-load", action="store_true",
                    help="fast engine: capture the largest canvases at load (by default the background thread "
                         "captures them right after load, which this script counts as captures while serving)")
    ap.add_argument("--encoding", default="jpeg+png", choices=KINDS)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--frames-per-size", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--min-size", type=int, default=800)
    ap.add_argument("--detections", type=int, default=100)
    ap.add_argument("--frontends", type=int, default=4)
    ap.add_argument("--factor", type=float, default=3.0, help="the goal: slowest <= FACTOR x p50 per size")
    ap.add_argument("--timeout", type=float, default=300.0, help="for the server to start")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    stop_on_sigterm()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="ddmixed-", dir="/tmp"))
    shown = {**vars(args), "sizes": [f"{w}x{h}" for w, h in args.sizes], "warmup": "%dx%d" % args.warmup}
    results: dict = {"args": shown, "cores": os.cpu_count(),
                     "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    def save(records: list | None = None) -> None:
        if records is not None:
            results["records"] = [[r[0], round(r[1], 4), round(r[2], 3), r[3], None if r[4] is None else round(r[4], 3)]
                                  for r in records]
        (out / "mixed.json").write_text(json.dumps(results, indent=1, default=str))
        (out / "mixed.md").write_text("\n".join(table(results)) + "\n")

    ww, wh = args.warmup
    folder = make_model(tmp, args.engine, args.arch, args.batch, wh, ww, args.detections, args.min_size,
                        fast_options={"max_canvases_at_load": True} if args.max_canvases_at_load else None)
    by_size = {f"{w}x{h}": requests_of(args.encoding, scenes(args.frames_per_size, h, w)) for w, h in args.sizes}
    gpu = args.device.split(":")[1] if args.device.startswith("cuda") else ""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu if gpu else "") if gpu or args.device == "cpu" \
        else dict(os.environ)
    biggest = max(args.sizes, key=lambda s: s[0] * s[1])
    server = Served(folder, tmp / "run", out / "mixed_serve.log", args.frontends, env,
                    slot_mb=slot_mb(biggest[1], biggest[0]), ring_slots=max(8, 4 * args.concurrency))
    server.start()
    records: list = []
    try:
        results["start_to_serving_s"] = round(server.wait_serving(args.timeout), 2)
        serving_wall = time.time()
        save()
        print(f"serving after {results['start_to_serving_s']} s; loading for {args.seconds} s", flush=True)
        records = asyncio.run(mixed_load(server.target, by_size, args.concurrency, args.seconds, time.perf_counter()))
    finally:
        server.stop()
    results["sizes"] = per_size(records, list(by_size), args.factor)
    events = log_events(server.log(), serving_wall)
    captures = [e for e in events if e["kind"] in ("capture_while_serving", "capture_at_load", "capture_failed")
                and e["at_s"] is not None and e["at_s"] >= 0]
    results["captures_while_serving"] = [f"{e['at_s']:.1f} s: {e['message']}" for e in captures]
    results["goal_met"] = not captures and all(r["met"] for r in results["sizes"].values())
    save(records)
    lines = table(results)
    print("\n" + "\n".join(lines), flush=True)
    path = picture(results, records, out)
    if path:
        print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
