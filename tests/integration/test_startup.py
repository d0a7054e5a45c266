"""Start to SERVING without waits that are not work (issue #18, start-up): what each step waits for is
an event, not a poll interval or another step it does not need. Asserted on order and on messages,
never on how long anything took (the numbers: BENCHMARKS.md, "Start-up on the CPU box, session 7")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import zmq

from dd.ipc import endpoints, messages
from tests.faults import null_model, wait_for
from tests.serverproc import REPO, ServerProcess

TESTS = Path(__file__).resolve().parents[1]


def gated_model(folder: Path, gate: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "categories.txt").write_text("thing\n")
    (folder / "node_config.json").write_text(json.dumps({
        "DETECTION_TYPE": "RGBGated", "ENGINE": "gated_engine:Gated", "ENGINE_OPTIONS": {"gate": str(gate)},
        "CATEGORY_FILE": "categories.txt", "DEVICES": "cpu"}))
    return folder


def test_the_zygote_starts_before_the_frontends(tmp_path: Path) -> None:
    """Its imports (torch: seconds) are the longest step of a start; the frontends start while it imports."""
    with ServerProcess(null_model(tmp_path / "m"), frontends=2) as srv:
        lines = srv.log().splitlines()
    zygote = next(i for i, line in enumerate(lines) if "started the worker zygote" in line)
    frontends = [i for i, line in enumerate(lines) if "started frontend-" in line]
    ready = next(i for i, line in enumerate(lines) if "worker zygote ready" in line)
    worker = next(i for i, line in enumerate(lines) if "started worker-" in line)
    assert len(frontends) == 2 and zygote < min(frontends), lines
    assert max(frontends) < ready < worker, lines  # the frontends did not wait for the zygote's imports
    assert "forked with its imports done" in lines[worker]


def test_a_worker_tells_its_frontends_when_it_is_loaded(tmp_path: Path) -> None:
    """A frontend that pinged a loading worker hears that it is ready without pinging again."""
    gate = tmp_path / "gate"
    folder = gated_model(tmp_path / "gated", gate)
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]))
    proc = subprocess.Popen([sys.executable, "-m", "dd", "worker", str(folder), "--model", "gated", "--gpu", "-1",
                             "--run-dir", str(run_dir)], env=env, cwd=REPO, stdin=subprocess.DEVNULL)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"fe-test")
    sock.setsockopt(zmq.LINGER, 0)
    try:
        path = endpoints.worker_socket(run_dir, "gated", 0)
        wait_for(lambda: (tmp_path / "gate.loading").exists() and path.exists(), 120, "the worker to start loading")
        sock.connect(endpoints.ipc_address(path))
        sock.send_multipart([messages.PING, messages.Ping(sent_at=1.0).SerializeToString()])
        assert sock.poll(60_000), "no answer to a ping"
        kind, payload = sock.recv_multipart()
        first = messages.Pong.FromString(payload)
        assert kind == messages.PONG and not first.ready and first.sent_at == 1.0
        gate.touch()  # the load finishes; no second ping is sent
        assert sock.poll(120_000), "the worker did not say that it is ready"
        kind, payload = sock.recv_multipart()
        told = messages.Pong.FromString(payload)
        assert kind == messages.PONG and told.ready and told.incarnation == first.incarnation
        assert told.engine == "gated"
    finally:
        sock.close()
        ctx.term()
        proc.terminate()
        proc.wait(60)


def test_a_frontend_looks_often_for_workers_only_while_a_model_has_none(tmp_path: Path) -> None:
    """At start the workers bind their sockets after the zygote's imports; the frontend looks for them
    every WAITING_DISCOVERY_INTERVAL_S until each of its models has one, then every DISCOVERY_INTERVAL_S."""
    import asyncio

    from dd.frontend import dispatcher as dmod

    async def check() -> None:
        d = dmod.Dispatcher(tmp_path, lambda model: 1, models=("a", "b"))
        try:
            assert d.next_discovery_s() == dmod.WAITING_DISCOVERY_INTERVAL_S < dmod.DISCOVERY_INTERVAL_S
            endpoints.worker_socket(tmp_path, "a", 0).touch()
            d._discover()
            assert d.next_discovery_s() == dmod.WAITING_DISCOVERY_INTERVAL_S  # b has none yet
            endpoints.worker_socket(tmp_path, "b", 3).touch()
            d._discover()
            assert d.next_discovery_s() == dmod.DISCOVERY_INTERVAL_S
        finally:
            await d.close()

    asyncio.run(check())


def test_the_supervisor_imports_no_numpy() -> None:
    """Every child starts after the supervisor's imports; numpy (shared-memory rings) is not among them."""
    code = "import sys, dd.cli, dd.supervisor; print('numpy' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "False"
