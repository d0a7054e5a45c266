"""dd.worker.engines.kernels.triton_key: Triton's key of itself computed in a thread, once, before a load's
first kernel needs it (no GPU needed: the key only reads and hashes Triton's files)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def test_the_key_is_computed_in_the_thread_and_cached_for_the_first_kernel() -> None:
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        from triton.runtime import cache
        from dd.worker.engines.kernels import triton_key
        assert cache.triton_key.cache_info().currsize == 0
        real = cache.triton_key.__wrapped__
        cache.triton_key.cache_clear()
        triton_key.start()
        triton_key.start()  # once per process
        triton_key.wait()
        info = cache.triton_key.cache_info()
        assert info.currsize == 1 and info.misses == 1, info
        assert triton_key._thread.name == "triton-key" and not triton_key._thread.is_alive()
        key = cache.triton_key()  # what a kernel's cache lookup calls: now a hit
        assert cache.triton_key.cache_info().hits == 1 and key == real()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr

