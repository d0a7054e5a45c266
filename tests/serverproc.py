"""A real `deep-detection serve` in a subprocess, for tests: start, wait for health, stop, inspect."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dd.ipc.endpoints import run_tag

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model_path: Path | None, *, frontends: int = 1, args: list[str] | None = None,
                 env: dict[str, str] | None = None, cwd: Path = REPO) -> None:
        """model_path None: `serve` with no PATH. Run in `cwd`, importing this checkout's `dd` wherever."""
        self.model_path = model_path
        self.cwd = cwd
        self.port = free_port()
        self.run_dir = Path(tempfile.mkdtemp(prefix="ddt-", dir="/tmp"))
        self.tag = run_tag(self.run_dir)
        self.log_path = Path(tempfile.mkstemp(prefix="dd-serve-", suffix=".log")[1])
        self.argv = [sys.executable, "-m", "dd", "serve"] + ([str(model_path)] if model_path else []) + [
                     "--host", "127.0.0.1",
                     "--port", str(self.port), "--frontends", str(frontends), "--run-dir", str(self.run_dir),
                     "--slot-mb", "4", "--ring-slots", "8",
                     "--metrics-port", "0"] + (args or [])  # metrics off: tests run side by side (8002)
        self.env = dict(os.environ, **(env or {}))
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), self.env.get("PYTHONPATH")]))
        self.proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "ServerProcess":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=self.cwd)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self, service: str = "") -> int | None:
        with grpc.insecure_channel(self.target) as ch:
            try:
                return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                            timeout=1.0).status
            except grpc.RpcError:
                return None

    def wait_serving(self, timeout: float = 180.0) -> "ServerProcess":
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if self.health() == health_pb2.HealthCheckResponse.SERVING:
                return self
            time.sleep(0.2)
        raise TimeoutError(f"server not SERVING after {timeout} s:\n{self.log()}")

    def ready_workers(self) -> dict[str, int]:
        """Ready workers per model, as ListModels says ({} while the server does not answer)."""
        from dd.proto.deep_detection.v1 import detector_pb2 as pb
        from dd.proto.deep_detection.v1 import detector_pb2_grpc as pb_grpc

        with grpc.insecure_channel(self.target) as ch:
            try:
                models = pb_grpc.DetectorStub(ch).ListModels(pb.ListModelsRequest(), timeout=2.0).models
            except grpc.RpcError:
                return {}
        return {m.name: m.ready_workers for m in models}

    def wait_workers_ready(self, expected: dict[str, int], timeout: float = 180.0) -> "ServerProcess":
        """Health turns SERVING once each model has one ready worker; a test that counts on all of them
        (which ones serve, how many) waits for this too, however slowly the others load."""
        end = time.monotonic() + timeout
        while True:
            ready = self.ready_workers()
            if all(ready.get(m, 0) >= n for m, n in expected.items()):
                return self
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > end:
                raise TimeoutError(f"ready workers {ready}, expected {expected} after {timeout} s:\n{self.log()}")
            time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        """Started and SERVING; stopped (SIGTERM) on leaving the block."""
        try:
            return self.start().wait_serving()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def segments(self) -> list[str]:
        return sorted(p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(f"dd-{self.tag}-"))

    def children(self) -> list[int]:
        import psutil

        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
