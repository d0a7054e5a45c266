"""A port that cannot be listened on: `serve` and `frontend` say why in one line and stop.

Before, the supervisor said it was serving, and each frontend failed to bind with a traceback and
was restarted for ever. Also: `--port 0` gives every frontend one port, chosen once, and `--host unix:PATH`
listens on PATH through one frontend.
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dd.listen_address import CannotListen, listen_problem
from tests.faults import Server, null_model, wait_for
from tests.serverproc import REPO, free_port

TIMEOUT_S = 60  # what a refusal may take on a busy machine; before, these commands never ended


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return null_model(tmp_path_factory.mktemp("listen") / "null")


@pytest.fixture
def taken() -> tuple[socket.socket, int]:
    """A port another program listens on (a plain socket: no SO_REUSEPORT)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s, s.getsockname()[1]
    s.close()


def serve(model: Path, run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "dd", "serve", str(model), "--run-dir", str(run_dir),
                           "--metrics-port", "0", "--slot-mb", "1", "--ring-slots", "4", *args],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=REPO)


def test_serve_on_a_taken_port_says_so_and_exits(model: Path, taken: tuple[socket.socket, int], tmp_path: Path) -> None:
    _, port = taken
    r = serve(model, tmp_path / "run", "--host", "127.0.0.1", "--port", str(port))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (f"deep-detection: cannot listen on 127.0.0.1:{port} (--port): the port is in use by "
                                f"another program (`ss -ltnp 'sport = :{port}'` names it); stop it, or choose "
                                "another --port"), r.stderr
    assert not (tmp_path / "run" / "supervisor.lock").exists()  # the run directory is free for the next start


def test_serve_with_a_taken_kserve_port_names_that_flag(model: Path, taken: tuple[socket.socket, int],
                                                         tmp_path: Path) -> None:
    _, port = taken
    r = serve(model, tmp_path / "run", "--host", "127.0.0.1", "--port", str(free_port()), "--kserve-port", str(port))
    assert r.returncode == 2, r.stderr
    assert f"cannot listen on 127.0.0.1:{port} (--kserve-port): the port is in use" in r.stderr, r.stderr


def test_serve_on_an_address_of_another_machine_says_so(model: Path, tmp_path: Path) -> None:
    r = serve(model, tmp_path / "run", "--host", "192.0.2.1", "--port", str(free_port()))  # TEST-NET-1: nobody's
    assert r.returncode == 2, r.stderr
    assert "192.0.2.1 is not an address of this machine" in r.stderr and "--host" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_second_server_on_the_port_of_a_running_one_is_refused(model: Path, tmp_path: Path) -> None:
    """Its frontends would have shared the port (SO_REUSEPORT, same user), and the kernel split the
    calls between the two servers, which may serve different models."""
    with Server(model).start() as first:
        first.wait_serving()
        r = serve(model, tmp_path / "second-run", "--host", "127.0.0.1", "--port", str(first.port))
        assert r.returncode == 2, r.stderr
        assert f"cannot listen on 127.0.0.1:{first.port} (--port): the port is in use" in r.stderr, r.stderr
        assert first.proc.poll() is None  # the first one serves on


def test_a_frontend_on_a_taken_port_exits_with_one_line_and_leaves_no_ring(
        model: Path, taken: tuple[socket.socket, int], tmp_path: Path) -> None:
    """`deep-detection frontend` as a process manager runs it: status 2, which the supervisor does not restart."""
    from dd.ipc.endpoints import run_tag

    _, port = taken
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "dd", "frontend", str(model), "--host", "127.0.0.1", "--port", str(port),
                        "--run-dir", str(run_dir), "--metrics-port", "0", "--slot-mb", "1", "--ring-slots", "4"],
                       capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=REPO)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"cannot listen on 127.0.0.1:{port} (--port): the port is in use" in lines[0], r.stderr
    tag = run_tag(run_dir)
    assert not [n for n in os.listdir("/dev/shm") if tag in n]


def test_a_port_taken_after_the_check_is_still_explained() -> None:
    """gRPC's own failure to bind (a port taken between the frontend's check and its bind) becomes
    CannotListen with the reason, whichever way this gRPC release reports it (an exception or port 0)."""
    import grpc

    from dd.config import ServerConfig
    from dd.frontend.server import listen

    async def bind(port: int) -> str:
        try:
            listen(grpc.aio.server(), ServerConfig(host="127.0.0.1", port=port), port, None, "--port")
        except CannotListen as exc:
            return str(exc)
        return ""

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        message = asyncio.run(bind(port))
    gc.collect()  # the aio server, while gRPC's threads can still run (dd.client.cli.release_grpc_aio)
    assert message.startswith(f"cannot listen on 127.0.0.1:{port} (--port): the port is in use"), message


def test_listen_problem_lets_a_frontend_share_its_port_but_not_a_new_server() -> None:
    """shared=True (a frontend's check) passes where the port's listeners share it; shared=False (the
    supervisor's, before any frontend of its own) does not."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert listen_problem("127.0.0.1", port, shared=True) is None
        assert "in use" in (listen_problem("127.0.0.1", port, shared=False) or "")
    assert listen_problem("127.0.0.1", port) is None  # closed: free again
    assert "does not resolve" in (listen_problem("no-such-host.invalid", 50051) or "")


def test_port_zero_gives_every_frontend_one_port(model: Path) -> None:
    """Each frontend asking for port 0 would have listened on a port of its own, none of them logged."""
    srv = Server(model, frontends=2, port=0).start()
    try:
        found = wait_for(lambda: re.search(r"--port 0: listening on port (\d+)", srv.log()), 60, "the chosen port")
        srv.port = int(found.group(1))
        assert srv.port > 0
        srv.wait_serving()
        on_port = rf"frontend pid \d+ serving null on 127\.0\.0\.1:{srv.port},"  # each frontend's line
        try:
            wait_for(lambda: len(re.findall(on_port, srv.log())) == 2, 60, "both frontends on the chosen port")
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{srv.log()}") from None
    finally:
        srv.stop()


def test_the_supervisor_stops_on_a_frontend_that_exits_with_a_configuration_error(model: Path, tmp_path: Path) -> None:
    """A frontend that exits with status 2 (it cannot listen: the port was taken after the supervisor's
    check) is not restarted: the supervisor stops and says why. A worker that exits 2 is restarted."""
    import time

    from dd.config import ServerConfig, discover_models
    from dd.procutil import EXIT_CONFIG
    from dd.supervisor import Child, Supervisor

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        sup = Supervisor(model, discover_models(str(model)), ServerConfig(host="127.0.0.1", port=port,
                                                                           run_dir=str(tmp_path)))
        exit_2 = [sys.executable, "-c", f"raise SystemExit({EXIT_CONFIG})"]
        worker = Child("worker-null.0", exit_2, dict(os.environ), failure_file=tmp_path / "never-written")
        frontend = Child("frontend-0", exit_2, dict(os.environ))
        for c in (worker, frontend):
            c.proc = subprocess.Popen(c.argv)
            c.started_at = time.monotonic()
            c.proc.wait()
        sup.children = [worker, frontend]
        sup._watch()
    assert sup._stop
    assert sup._config_problem.startswith(f"cannot listen on 127.0.0.1:{port} (--port): the port is in use")
    assert frontend.proc is None and worker.restart_at > 0  # the worker was put down for a restart


def test_a_unix_socket_serves_through_one_frontend_and_is_not_taken_by_a_second_server(model: Path,
                                                                                       tmp_path: Path) -> None:
    """`--host unix:PATH` listens on PATH (it listened on "PATH:50051" before, where no client looked), with
    one frontend when the count is left to the cores (a socket file cannot be shared as a TCP port is)."""
    import grpc
    import numpy as np
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from dd.client import DetectorClient

    sock = tmp_path / "dd.sock"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dd", "serve", str(model), "--host", f"unix:{sock}",
                                 "--run-dir", str(tmp_path / "run"), "--metrics-port", "0", "--slot-mb", "1",
                                 "--ring-slots", "4"], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        def serving() -> bool:
            assert proc.poll() is None, log.read_text()
            with grpc.insecure_channel(f"unix:{sock}") as ch:
                try:
                    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status \
                        == health_pb2.HealthCheckResponse.SERVING
                except grpc.RpcError:
                    return False

        wait_for(serving, 120, "SERVING on the socket", interval=0.2)
        with DetectorClient(f"unix:{sock}", timeout=30) as client:
            result = client.detect(np.zeros((48, 64, 3), np.uint8), np.full((48, 64), 1000, np.uint16))
        assert len(result.instances) == 4  # the null model's
        assert f"serving null on unix:{sock} with 1 worker(s) and 1 frontend(s)" in log.read_text()
        second = serve(model, tmp_path / "second-run", "--host", f"unix:{sock}")
        assert second.returncode == 2, second.stderr
        assert f"a server is listening on {sock}" in second.stderr, second.stderr
        assert serving()  # the first one still has its socket
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert not sock.exists()  # gRPC removes it at stop


def test_a_unix_socket_refuses_more_frontends_and_a_kserve_port(model: Path, tmp_path: Path) -> None:
    host = f"unix:{tmp_path / 'dd.sock'}"
    r = serve(model, tmp_path / "run", "--host", host, "--frontends", "2")
    assert r.returncode == 2 and "is served by one frontend" in r.stderr and "--frontends 1" in r.stderr, r.stderr
    r = serve(model, tmp_path / "run", "--host", host, "--kserve-port", str(free_port()))
    assert r.returncode == 2 and "leave --kserve-port out" in r.stderr, r.stderr


def test_listen_problem_on_unix_paths(tmp_path: Path) -> None:
    """A stale socket file is no problem (gRPC replaces it); a live one, a plain file or a missing folder are."""
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listening, then closed: the file stays
    assert stale.exists() and listen_problem(f"unix:{stale}", 0) is None
    assert listen_problem(f"unix://{stale}", 0) is None  # gRPC's unix:///ABSOLUTE spelling
    live = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(live))
        s.listen()
        assert "a server is listening on" in (listen_problem(f"unix:{live}", 0) or "")
    plain = tmp_path / "plain"
    plain.write_text("")
    assert "is not a socket" in (listen_problem(f"unix:{plain}", 0) or "")
    assert "does not exist" in (listen_problem(f"unix:{tmp_path / 'no' / 'dd.sock'}", 0) or "")
