"""dd.procutil.name_os_thread: a frontend's decode threads carry their names into the operating system, so
that per-thread CPU (scripts/bench_frontend_cpu.py --threads, top -H) can tell them from gRPC's and
ZeroMQ's threads."""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from dd.procutil import name_os_thread

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names in /proc: Linux")


def os_name() -> str:
    with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
        return f.read().strip()


def test_a_pool_thread_has_its_python_name() -> None:
    with ThreadPoolExecutor(1, thread_name_prefix="depth-decode", initializer=name_os_thread) as pool:
        assert pool.submit(os_name).result() == "depth-decode_0"


def test_a_long_name_is_cut_to_what_linux_keeps() -> None:
    def named() -> str:
        assert name_os_thread("a-name-longer-than-fifteen-bytes")
        return os_name()

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(named).result() == "a-name-longer-t"


def test_the_frontends_decode_pools_name_their_threads() -> None:
    from dd.frontend import decode

    assert decode._DEPTH_POOL.submit(os_name).result().startswith("depth-decode_")
    assert decode._PARTS_POOL.submit(os_name).result().startswith("decode-part_")
