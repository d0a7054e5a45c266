"""The GPU's primary CUDA context, created through the driver while the worker does other things.

A process's first CUDA call creates its context: about 0.3 s on an H200 host (cuInit, then the
device's primary context; S19-1), which a worker's load otherwise waits for before anything else. The
driver API needs no torch and, called through ctypes, releases the GIL, so a thread can create the same
primary context (the one torch's runtime then uses) while the worker builds its model on the CPU.
torch's own initialisation then finds it there (0.02 s instead of 0.33 s, S19-1). Called twice at
once, the driver does the work once and the second caller waits for it, so nothing has to be joined.

Nothing depends on it: where the driver is missing or refuses, the thread ends and torch creates the
context itself at its first CUDA call, as before.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time

log = logging.getLogger(__name__)


def _retain_primary_context(ordinal: int) -> None:
    t0 = time.perf_counter()
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        dev, ctx = ctypes.c_int(), ctypes.c_void_p()
        for call, args in (("cuInit", (0,)), ("cuDeviceGet", (ctypes.byref(dev), ordinal)),
                           ("cuDevicePrimaryCtxRetain", (ctypes.byref(ctx), dev))):
            err = getattr(libcuda, call)(*args)
            if err != 0:
                raise OSError(f"{call} returned CUDA error {err}")
    except (OSError, AttributeError) as exc:  # no driver, no such device: torch reports it at its first call
        log.debug("CUDA context not created ahead (%s); torch creates it at its first call", exc)
        return
    # Retained for the process's life, as torch's runtime retains it too: never released here.
    log.debug("CUDA primary context of device %d created ahead in %.2f s", ordinal, time.perf_counter() - t0)


def create_ahead(ordinal: int = 0) -> threading.Thread:
    """Starts creating the primary context of CUDA device `ordinal` (as this process numbers devices,
    after CUDA_VISIBLE_DEVICES) in a daemon thread; returns the thread."""
    thread = threading.Thread(target=_retain_primary_context, args=(ordinal,), name="cuda-context", daemon=True)
    thread.start()
    return thread
