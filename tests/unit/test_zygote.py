"""The worker zygote: children forked with its imports done, their exits reported as subprocess would."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from dd.procutil import process_argv
from dd.zygote import Zygote, ZygoteProcess

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def zygote():
    z = Zygote(["colorsys"], dict(os.environ, PYTHONPATH=str(REPO)))
    yield z
    z.close()


def child_argv(report: Path, *extra: str, role: str = "child") -> list[str]:
    return [sys.executable, "-m", "tests.zygote_child", role, "--parent-pid", "1", "--report", str(report), *extra]


def read_report(path: Path) -> dict:
    from tests.faults import wait_for

    wait_for(lambda: path.exists() and path.stat().st_size > 0, 60, "the child's report")
    return json.loads(path.read_text())


def test_child_runs_its_module_with_the_zygotes_imports_and_its_own_environment(zygote: Zygote, tmp_path: Path) -> None:
    proc = zygote.spawn(child_argv(tmp_path / "r.json"), {"ZYGOTE_TEST": "mine", "PYTHONPATH": str(REPO)}, None)
    report = read_report(tmp_path / "r.json")
    assert report["preloaded"], "the module the zygote imported is already there in the child"
    # The zygote's objects are frozen (its children's collections never scan them); collection itself is on.
    assert report["gc_enabled"] and report["frozen"] > 1000
    assert report["env"] == "mine"
    # Its parent is the zygote, and it was told so (it stops when the zygote does).
    assert report["ppid"] == zygote.proc.pid
    assert report["argv"][report["argv"].index("--parent-pid") + 1] == str(zygote.proc.pid)
    assert psutil.Process(proc.pid).name() == "dd-child"
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL


def test_exit_code_and_log_file(zygote: Zygote, tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    proc = zygote.spawn(child_argv(tmp_path / "r.json", "--exit", "3"), dict(os.environ, PYTHONPATH=str(REPO)),
                        str(log))
    assert isinstance(proc, ZygoteProcess)
    assert proc.wait(60) == 3
    assert log.exists()


def test_a_forked_worker_is_named_as_one(zygote: Zygote, tmp_path: Path) -> None:
    """Tools that sort processes by role (bench_serve, soak) see a forked worker as `python -m dd worker`,
    though its command line is the zygote's."""
    proc = zygote.spawn(child_argv(tmp_path / "r.json", role="worker"), dict(os.environ, PYTHONPATH=str(REPO)),
                        None)
    read_report(tmp_path / "r.json")
    seen = psutil.Process(proc.pid)
    assert "dd.zygote" in seen.cmdline()
    assert process_argv(seen)[1:4] == ["-m", "dd", "worker"]
    proc.kill()
    proc.wait(30)


def test_zygote_stops_when_the_supervisor_side_closes(tmp_path: Path) -> None:
    z = Zygote([], dict(os.environ, PYTHONPATH=str(REPO)))
    pid = z.proc.pid
    z.close()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_starting_a_zygote_does_not_wait_for_its_imports(tmp_path: Path) -> None:
    """The supervisor starts the frontends while the zygote imports (issue #18, start-up): creating the
    handle returns with the import still held open; the first spawn waits for it, then forks."""
    from tests.faults import wait_for

    gate = tmp_path / "gate"
    z = Zygote(["tests.zygote_gate"], dict(os.environ, PYTHONPATH=str(REPO), DD_TEST_ZYGOTE_GATE=str(gate)),
               start_timeout_s=120)
    try:
        wait_for(lambda: (tmp_path / "gate.importing").exists(), 60, "the zygote's import to begin")
        assert z.alive() and not gate.exists()  # here while the import still waits
        gate.touch()
        proc = z.spawn(child_argv(tmp_path / "r.json"), dict(os.environ, PYTHONPATH=str(REPO)), None)
        assert read_report(tmp_path / "r.json")["ppid"] == z.proc.pid
        proc.kill()
        proc.wait(30)
    finally:
        z.close()


def test_children_inherit_what_the_zygote_computed_beside_its_imports(tmp_path: Path) -> None:
    """`beside` calls run in threads of their own while the zygote imports, and are finished before it
    forks: a child finds the result cached (issue #18, start-up: Triton's key of itself, 0.4-0.5 s of a
    worker's load otherwise). A call that fails, or whose module is missing, costs only itself."""
    gate = tmp_path / "gate"
    env = dict(os.environ, PYTHONPATH=str(REPO), DD_TEST_BESIDE_GATE=str(gate))
    z = Zygote(["colorsys"], env, beside=["no_such_module_here:f", "tests.zygote_beside:boom",
                                          "tests.zygote_beside:key"])
    try:
        from tests.faults import wait_for

        wait_for(lambda: (tmp_path / "gate.waiting").exists(), 60, "the call beside the imports to begin")

        def open_gate() -> None:  # once a child reported (it was forked before the call ended), or after 1 s
            until = time.monotonic() + 1.0
            while time.monotonic() < until and not (tmp_path / "r.json").exists():
                time.sleep(0.01)
            gate.touch()

        opener = threading.Thread(target=open_gate)
        opener.start()
        # Asked while the call is still held open: the zygote forks only once it has ended.
        proc = z.spawn(child_argv(tmp_path / "r.json", "--cached", "tests.zygote_beside:key"), env, None)
        opener.join()
        report = read_report(tmp_path / "r.json")
        assert report["cached"]["tests.zygote_beside:key"] == {"entries": 1, "value": "beside-key"}
        proc.kill()
        proc.wait(30)
    finally:
        z.close()


def test_without_beside_calls_a_child_computes_for_itself(zygote: Zygote, tmp_path: Path) -> None:
    """The control for the test above: the same child, from a zygote asked for nothing beside."""
    proc = zygote.spawn(child_argv(tmp_path / "r.json", "--cached", "tests.zygote_beside:key"),
                        dict(os.environ, PYTHONPATH=str(REPO)), None)
    assert read_report(tmp_path / "r.json")["cached"]["tests.zygote_beside:key"] == {"entries": 0, "value": None}
    proc.kill()
    proc.wait(30)


def test_triton_key_is_inherited_from_the_zygote(tmp_path: Path) -> None:
    """The real call the supervisor asks for where a fast engine runs on a GPU: Triton's key of itself."""
    pytest.importorskip("triton")
    from dd.kernel_cache import TRITON_SELF_KEY

    env = dict(os.environ, PYTHONPATH=str(REPO))
    z = Zygote(["colorsys"], env, beside=[TRITON_SELF_KEY])
    try:
        proc = z.spawn(child_argv(tmp_path / "r.json", "--cached", TRITON_SELF_KEY), env, None)
        got = read_report(tmp_path / "r.json")["cached"][TRITON_SELF_KEY]
        import triton

        assert got["entries"] == 1 and got["value"].startswith(triton.__version__)
        proc.kill()
        proc.wait(30)
    finally:
        z.close()
