"""One way to run a Triton kernel with its plain-torch fallback: try the kernel, and where it cannot run
here (no compiler, an unsupported GPU) say so in one log line, remember it, and use torch from then on.

Every kernel in this package has a torch version with the same semantics; a failure to compile or
launch must never fail a request, only make it slower, and must not fill the log. The one exception is
a failure inside a CUDA graph capture: that is the capturing caller's to handle (it re-captures or
gives up on graphs), so it is raised and the switch stays as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")


def _always() -> bool:
    return True


class KernelSwitch:
    """Whether a Triton step runs: while it is enabled (an engine option), its kernel is available
    (Triton installed) and it has not failed here yet; with cuda_only, only for CUDA devices (the
    CPU runs the torch version unless a caller asks for the kernel explicitly, e.g. in Triton's
    interpreter).

    what names the kernel in the log line ("paste kernel"); instead says what happens instead
    ("pasting with torch operations instead")."""

    def __init__(self, what: str, instead: str, available: Callable[[], bool] = _always,
                 enabled: bool = True, cuda_only: bool = True) -> None:
        self.what = what
        self.instead = instead
        self.available = available
        self.enabled = enabled
        self.cuda_only = cuda_only
        self.failed = False

    @property
    def on(self) -> bool:
        """Enabled, available and not failed (whatever the device)."""
        return self.enabled and not self.failed and self.available()

    def by_default(self, dev: torch.device) -> bool:
        """Whether the kernel runs for tensors on dev."""
        return (dev.type == "cuda" or not self.cuda_only) and self.on

    def cannot_run(self, exc: Exception, on: torch.Tensor | None = None) -> None:
        """Switches to the torch version, with one log line; a failure inside a CUDA graph capture of
        the tensor `on`'s device is re-raised (the caller's)."""
        if on is not None and on.is_cuda and torch.cuda.is_current_stream_capturing():
            raise exc
        if not self.failed:
            log.warning("the Triton %s cannot run here (%s: %s); %s", self.what, type(exc).__name__, exc,
                        self.instead)
        self.failed = True

    def run(self, kernel: Callable[[], T], fallback: Callable[[], T], on: torch.Tensor) -> T:
        """kernel() where the switch is on for on's device, else (and where the kernel raises) fallback()."""
        if self.by_default(on.device):
            try:
                return kernel()
            except Exception as exc:  # noqa: BLE001 - no compiler, unsupported GPU: torch does it
                self.cannot_run(exc, on)
        return fallback()

    def probe(self, trial: Callable[[], object], undo: Callable[[], None]) -> bool:
        """For kernels installed into a model (patched forwards): runs trial() once (a forward on a
        small input); where it raises, calls undo() (puts torch's operations back) and switches off.
        Returns whether the kernels stay."""
        if not self.on:
            undo()
            return False
        try:
            trial()
            return True
        except Exception as exc:  # noqa: BLE001 - no compiler, unsupported GPU: torch's operations do it
            undo()
            self.cannot_run(exc)
            return False
