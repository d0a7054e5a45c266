"""GraphCache: shapes without a graph are served at once (None) while one thread captures them."""

from __future__ import annotations

import logging
import threading

import pytest

from dd.worker.engines.fast.graph_cache import GraphCache


class Capturer:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[object] = []
        self.release = threading.Event()
        self.threads: list[str] = []
        self.fail = fail

    def __call__(self, key: object) -> str:
        self.calls.append(key)
        self.threads.append(threading.current_thread().name)
        assert self.release.wait(30), "the test never released the capture"
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        return f"graph {key}"


def test_missing_shape_is_served_without_waiting_and_captured_once_in_the_background() -> None:
    cap = Capturer()
    cache = GraphCache(cap)
    # The capture is held until released: every get meanwhile answers None (serve op by op) at once.
    assert [cache.get((1, 480, 640)) for _ in range(5)] == [None] * 5
    assert cache.pending() == 1
    cap.release.set()
    assert cache.wait_idle(30)
    assert cache.get((1, 480, 640)) == "graph (1, 480, 640)"
    assert cap.calls == [(1, 480, 640)]
    assert cap.threads == ["graph-capture"]
    assert cache.captured_in_background == 1
    cache.close()


def test_shapes_queue_behind_each_other() -> None:
    cap = Capturer()
    cache = GraphCache(cap)
    assert cache.get("a") is None and cache.get("b") is None and cache.get("a") is None
    cap.release.set()
    assert cache.wait_idle(30)
    assert (cache.get("a"), cache.get("b")) == ("graph a", "graph b")
    assert cap.calls == ["a", "b"]
    cache.close()


def test_a_failed_capture_leaves_the_shape_op_by_op_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    cap = Capturer(fail=True)
    cache = GraphCache(cap, describe=lambda k: f"shape {k}")
    with caplog.at_level(logging.WARNING, logger="dd.worker.engines.fast.graph_cache"):
        assert cache.get("x") is None
        cap.release.set()
        assert cache.wait_idle(30)
        assert [cache.get("x") for _ in range(3)] == [None] * 3
    assert cap.calls == ["x"], "a failed shape must not be captured again and again"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "shape x" in warnings[0] and "op by op" in warnings[0]
    cache.close()


def test_without_background_the_capture_happens_in_the_caller() -> None:
    cap = Capturer()
    cap.release.set()
    cache = GraphCache(cap, background=False)
    assert cache.get("y") == "graph y"
    assert cap.threads == [threading.current_thread().name]


def test_capture_now_at_load_is_in_the_caller_and_kept() -> None:
    cap = Capturer()
    cap.release.set()
    cache = GraphCache(cap)
    assert cache.capture_now("z") == "graph z"
    assert cache.get("z") == "graph z"
    assert cap.calls == ["z"] and cache.captured_in_background == 0


def test_close_drops_queued_shapes() -> None:
    cap = Capturer()
    cache = GraphCache(cap)
    cache.get("a")
    cache.get("b")
    cache.close()
    cap.release.set()
    assert cache.get("c") is None  # closed: nothing new is queued
    assert "c" not in cap.calls


def test_close_waits_for_the_capture_under_way() -> None:
    """close() returns only once the capture thread is out of its capture: another engine's capture in
    the same process (CUDA's capture mode is global at load) or the CUDA context's teardown must not meet
    it. Before, close() only flagged the thread."""
    cap = Capturer()
    cache = GraphCache(cap)
    assert cache.get("a") is None and cache.get("b") is None
    while not cap.calls:  # the thread is inside the capture of "a"
        threading.Event().wait(0.01)
    closer = threading.Thread(target=cache.close)
    closer.start()
    closer.join(0.5)
    assert closer.is_alive(), "close() returned while a capture was still running"
    cap.release.set()
    closer.join(30)
    assert not closer.is_alive()
    assert cap.calls == ["a"], "no capture starts after close"
    assert cache.get("c") is None


def test_an_exiting_interpreter_lets_a_background_capture_end(tmp_path) -> None:
    """A process that exits while the daemon thread captures: with CUDA that aborted the process
    ("terminate called without an active exception", exit 134: the worker, scripts and pytest itself
    after a fast engine was loaded). At exit the cache now waits for the capture; here the capture
    writes a file when it ends, which a killed thread never does."""
    import subprocess
    import sys
    done = tmp_path / "done"
    code = f"""
import threading, time
from dd.worker.engines.fast.graph_cache import GraphCache
started = threading.Event()
def capture(key):
    started.set()
    time.sleep(1.0)
    open({str(done)!r}, "w").write("captured")
    return key
cache = GraphCache(capture)
cache.get("k")
started.wait(30)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert done.read_text() == "captured"
