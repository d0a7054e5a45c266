"""Building a network whose every parameter a checkpoint then overwrites, without drawing random values first.

torchvision's and torch's modules initialise their weights at construction (kaiming_normal_,
uniform_ ...): 0.3 s of CPU for an R50-FPN Mask R-CNN on the CI box, on a worker's path to
serving, for values that load_state_dict replaces at once. Inside skip_random_init(), the random
fills the initialisers end in (Tensor.normal_ and Tensor.uniform_) leave the tensor as torch.empty
made it; everything else (shapes, buffers, anchors, constant fills) runs as usual.

Use it only where the load that follows is strict (every parameter and buffer of the module in the
checkpoint, or an error): a value left out would otherwise be uninitialised memory, not random.
The mode is a torch function mode: it applies to the calling thread only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# The fills themselves, and the initialisers that hand themselves to a torch function mode before they
# reach one (a mode's own call to them would run unwatched).
_RANDOM_FILLS = frozenset({torch.Tensor.normal_, torch.Tensor.uniform_, torch.nn.init.normal_,
                           torch.nn.init.uniform_, torch.nn.init.kaiming_uniform_})


class skip_random_init(TorchFunctionMode):  # noqa: N801 - used as a context manager, named like torch's
    """`with skip_random_init(): model = build(...)`, then a strict load_state_dict."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in _RANDOM_FILLS:  # each returns the tensor it fills (torch.nn.init's pass it by keyword)
            return args[0] if args else (kwargs or {})["tensor"]
        return func(*args, **(kwargs or {}))
