"""Triton's cache key of itself, computed beside the engine's load instead of at its first kernel.

Before any kernel of a process is looked up in Triton's on-disk cache, Triton computes `triton_key()`
once: a SHA-256 of its own compiler and language sources and of its ~0.5 GB libtriton library. On an
H200 host that took 0.37 s of every warm fast-engine load (S15-4: the first Triton kernel's launch in
"fusing and kernels", before any cached kernel could be used), after the weights were on the GPU.
It needs no GPU and spends its time reading and hashing (both release the GIL), so it can run in a
thread while the main thread loads the weights and initialises CUDA; start() does that, and wait() is
called before the first kernel so that the key is computed once (functools.lru_cache does not make a
second caller wait for the first).
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("dd.worker")

_thread: threading.Thread | None = None


def _compute() -> None:
    t0 = time.perf_counter()
    try:
        from triton.runtime.cache import triton_key
    except ImportError:  # another Triton layout: its first kernel computes it as before
        return
    try:
        triton_key()
    except Exception as exc:  # noqa: BLE001 - the first kernel computes it again and reports any error
        log.debug("computing Triton's cache key ahead failed: %s", exc)
        return
    log.debug("Triton's cache key computed ahead in %.2f s", time.perf_counter() - t0)


def start() -> None:
    """Computes Triton's key in a thread of this process, once (no-op without Triton)."""
    global _thread
    if _thread is None:
        _thread = threading.Thread(target=_compute, name="triton-key", daemon=True)
        _thread.start()


def wait() -> None:
    """Returns once the key started by start() is computed (at once if none was started)."""
    if _thread is not None:
        _thread.join()
