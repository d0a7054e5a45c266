#!/usr/bin/env python3
"""The first request after SERVING against the ones after it: the null engine, one frontend, source trees
side by side.

What a process does once (imports, a library's first call, a thread pool's first thread) lands on the
first request it serves unless it is done before the process says it is ready. Each round starts
`deep-detection serve` from each tree named (`--tree before=/tmp/before --tree after=.`; this checkout's
client talks to each), connects (ListModels, so the channel's set-up is not counted), then sends
`--requests` JPEG + 16-bit PNG RGB-D requests one at a time and stops the server. Per tree: the server's
own total (the Detector response's Timing: from the frontend's start on the request to the end of the
worker's encoding) and the client's latency, for the first request and for the later ones (medians over
the rounds).

    git worktree add /tmp/before <commit> && \\
        python scripts/bench_first_request.py --tree before=/tmp/before --tree after=. --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_fixed_cost import null_model  # noqa: E402
from bench_requests import Served, env_with_repo, free_port, requests_of, scenes  # noqa: E402


def one_round(root: Path, model: Path, tmp: Path, requests: list, n: int) -> list[tuple[float, float]]:
    """(client ms, server total ms) of n requests sent one at a time to a server just started from root."""
    from dd.client import DetectorClient

    port = free_port()
    served = Served(model, tmp / f"run-{port}", tmp / f"serve-{root.name}-{port}.log", 1,
                    env=env_with_repo(root), ring_slots=8, port=port, cwd=root).start()
    try:
        served.wait_serving(300)
        client = DetectorClient(served.target, timeout=60)
        client.list_models()  # connected: the channel's set-up is not the first request's
        out = []
        for k in range(n):
            t = time.perf_counter()
            result = client.detect_request(requests[k % len(requests)])
            out.append(((time.perf_counter() - t) * 1e3, result.timing["total_us"] / 1e3))
        client.close()
        return out
    finally:
        served.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                    help="a source tree to serve from (repeat to compare; default: this checkout)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=8, help="per round: the first and the later ones")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=640)
    args = ap.parse_args()
    if args.requests < 2:
        ap.error("--requests must be at least 2: the first request and the later ones")

    from dd.proto.deep_detection.v1 import detector_pb2 as pb

    trees = [(t.split("=", 1)[0], Path(t.split("=", 1)[1]).resolve()) for t in args.tree] or [("this", REPO)]
    tmp = Path(tempfile.mkdtemp(prefix="dd-first-"))
    model = null_model(tmp, 4)
    requests = [pb.DetectRequest.FromString(r) for r in requests_of("jpeg+png", scenes(3, args.height, args.width))]
    got: dict[str, list[list[tuple[float, float]]]] = {name: [] for name, _ in trees}
    for r in range(args.rounds):
        for name, root in trees[r % len(trees):] + trees[:r % len(trees)]:  # order rotated per round
            got[name].append(one_round(root, model, tmp, requests, args.requests))
    print(f"JPEG + 16-bit PNG {args.width}x{args.height}, null engine, one frontend, {args.rounds} rounds of "
          f"{args.requests} requests one at a time")
    print("| tree | first: server total ms (per round) | later: server total ms, median | first: client ms "
          "(median) | later: client ms (median) |")
    print("|---|---|---|---|---|")
    for name, rounds in got.items():
        first = [r[0] for r in rounds]
        later = [x for r in rounds for x in r[1:]]
        print(f"| {name} | {', '.join(f'{s:.1f}' for _, s in first)} | {statistics.median(s for _, s in later):.1f} | "
              f"{statistics.median(c for c, _ in first):.1f} | {statistics.median(c for c, _ in later):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
