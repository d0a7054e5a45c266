"""NVIDIA's tritonclient in a virtual environment of its own, made once and re-used.

tritonclient[grpc] pins protobuf < 7 while deep-detection needs protobuf 7, so
the two cannot share an interpreter. Tests that check our KServe v2 / Triton
wire against the real client run tritonclient's code in this environment as a
subprocess and read what it prints.

The environment lives under the user's cache (``$XDG_CACHE_HOME`` or
``~/.cache``, ``deep-detection/tritonclient-<version>-py<X.Y>``; override with
``DD_TRITONCLIENT_VENV``), so a second test run, or a fresh clone on the same
machine, pays nothing. Making it took 25 s on a busy 2-core machine with an
empty pip cache (154 MB on disk); re-using it costs nothing. A
``.complete`` file is written last: a half-made environment (an interrupted
run) is removed and made again. A lock keeps two pytest processes from making
it at once.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

TRITONCLIENT_VERSION = "2.73.0"
REQUIREMENT = f"tritonclient[grpc]=={TRITONCLIENT_VERSION}"

# pip's messages when it cannot reach the package index at all (as opposed to
# a wrong pin, which must fail the test rather than skip it).
_UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
                "Name or service not known", "Network is unreachable", "ConnectTimeoutError", "ProxyError",
                "Connection refused", "No route to host", "ReadTimeoutError", "SSLError")


def venv_dir() -> Path:
    override = os.environ.get("DD_TRITONCLIENT_VENV")
    if override:
        return Path(override)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "deep-detection" / f"tritonclient-{TRITONCLIENT_VERSION}-py{sys.version_info[0]}.{sys.version_info[1]}"


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _create(venv: Path) -> float:
    """Makes the environment; returns the seconds it took. Skips the calling test
    when the package index cannot be reached."""
    started = time.monotonic()
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    pip = subprocess.run(
        [str(_python(venv)), "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--quiet",
         "--retries", "2", "--timeout", "30", REQUIREMENT],
        capture_output=True, text=True, timeout=900)
    if pip.returncode != 0:
        shutil.rmtree(venv, ignore_errors=True)
        output = pip.stdout + pip.stderr
        if any(marker in output for marker in _UNREACHABLE):
            pytest.skip(f"cannot install {REQUIREMENT}: the package index is unreachable ({output.strip()[-300:]})")
        raise RuntimeError(f"pip install {REQUIREMENT} into {venv} failed:\n{output}")
    (venv / ".complete").write_text(REQUIREMENT + "\n")
    return time.monotonic() - started


def tritonclient_python() -> Path:
    """The interpreter of an environment where ``import tritonclient.grpc`` works."""
    venv = venv_dir()
    if (venv / ".complete").exists() and _python(venv).exists():
        return _python(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another pytest may be making it: wait, then re-use
        if not (venv / ".complete").exists():
            seconds = _create(venv)
            print(f"\nmade {venv} ({REQUIREMENT}) in {seconds:.1f} s", file=sys.stderr)
    return _python(venv)


def run(script: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Runs ``script`` with tritonclient's interpreter; fails with its output if it fails."""
    done = subprocess.run([str(tritonclient_python()), str(script), *args], capture_output=True, text=True,
                          timeout=timeout, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    if done.returncode != 0:
        raise AssertionError(f"{script.name} failed in tritonclient's environment:\n{done.stdout}\n{done.stderr}")
    return done
