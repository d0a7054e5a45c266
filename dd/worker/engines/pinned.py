"""Page-locking the shared-memory rings that inputs arrive in, so copies to the GPU are DMA.

Any GPU engine reads its inputs from the worker's rings (numpy views of an mmap). Registering a
ring's mapping with CUDA once (cudaHostRegister) lets host-to-device copies from it run as DMA,
asynchronous and at full bus speed, without an extra copy through a pinned staging buffer.
Pinning is an optimisation: where it fails, copies still work, slower, and one log line says why.
"""

from __future__ import annotations

import ctypes
import logging
import mmap

import numpy as np
import torch

log = logging.getLogger(__name__)


class PinnedMappings:
    """The mappings pinned so far, by identity; enabled is the engine's pin_memory option (on CUDA)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._pinned: dict[int, tuple[mmap.mmap, ctypes.c_char]] = {}

    def pin_source(self, arr: np.ndarray) -> None:
        """Page-locks the shared-memory mapping arr lives in, once (nothing for other arrays)."""
        if not self.enabled:
            return
        base = arr.base
        while isinstance(base, (np.ndarray, memoryview)):  # np.frombuffer(mapping) keeps a memoryview of it
            base = base.obj if isinstance(base, memoryview) else base.base
        if isinstance(base, mmap.mmap):
            self.pin_mapping(base)

    def pin_mapping(self, base: mmap.mmap) -> None:
        """Page-locks a shared-memory mapping, once: ahead of its first batch when the worker knows
        the ring early (the first batch of each frontend paid it otherwise: tens of ms per 100 MB)."""
        if not self.enabled or id(base) in self._pinned:
            return
        try:
            # The ctypes view exports the mapping's buffer, so the worker cannot unmap a ring while
            # it is registered (ShmRing.close leaves the map to the last view); when the ring's
            # frontend goes, the worker calls release_input_memory, which unregisters it.
            view = ctypes.c_char.from_buffer(base)
            err = torch.cuda.cudart().cudaHostRegister(ctypes.addressof(view), len(base), 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister returned {err}")
            self._pinned[id(base)] = (base, view)
        except Exception as exc:  # noqa: BLE001 - pinning is an optimisation; never fail a request for it
            log.warning("cannot pin shared memory for faster copies: %s", exc)
            self.enabled = False

    def release(self, mapping: object) -> None:
        """Unregisters a mapping that goes (its ring's frontend went); nothing if it was not pinned."""
        entry = self._pinned.get(id(mapping))
        if entry is None or entry[0] is not mapping:
            return
        del self._pinned[id(mapping)]
        try:
            torch.cuda.cudart().cudaHostUnregister(ctypes.addressof(entry[1]))
        except Exception as exc:  # noqa: BLE001 - the mapping goes anyway with the process
            log.warning("cannot unregister a released shared-memory mapping: %s", exc)

    def close(self) -> None:
        """Unregisters every mapping (the engine closes), best effort."""
        for _, view in self._pinned.values():
            try:
                torch.cuda.cudart().cudaHostUnregister(ctypes.addressof(view))
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
        self._pinned.clear()
