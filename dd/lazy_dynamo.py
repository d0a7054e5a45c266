"""torchvision without torch._dynamo at import: the largest avoidable part of a worker's imports.

`import torchvision` imports torch._dynamo (with sympy and most of torch.distributed): its
package imports torchvision.ops.roi_align, whose module level has
``from torch._dynamo.utils import is_compile_supported``. That is 1.2 s of the 2.6 s the
fast engine's imports take on the 2-core CI box (`python -X importtime`), paid by the
worker zygote on the path start -> SERVING. The function is called only where torchvision's
compiled RoI Align cannot run (no compiled ops, or deterministic algorithms on a GPU), and no
engine of this project uses torch._dynamo.

install() puts a finder at the front of sys.meta_path. When torchvision is first imported,
its package runs with a stand-in module at sys.modules["torch._dynamo.utils"] that has
only is_compile_supported (which imports the real one when first called); the stand-in is
removed as soon as torchvision's package has run, so that anything importing torch._dynamo
afterwards (torch.compile, a user's engine) gets the real module. Any other attribute read
from the stand-in meanwhile (a newer torchvision importing more names) imports the real module
at once and hands that attribute over: the old behaviour, only not faster.

Nothing here imports torch; install() is cheap and does nothing once torchvision is imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import types
from typing import Any

UTILS = "torch._dynamo.utils"
_lock = threading.Lock()


def is_compile_supported(device_type: Any) -> Any:
    """torch._dynamo.utils.is_compile_supported, importing torch._dynamo at its first call."""
    from torch._dynamo.utils import is_compile_supported as real

    return real(device_type)


class _StandIn(types.ModuleType):
    """sys.modules["torch._dynamo.utils"] while torchvision's package runs."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        _remove_stand_in(self)
        return getattr(importlib.import_module(UTILS), name)


def _remove_stand_in(stand_in: types.ModuleType) -> None:
    if sys.modules.get(UTILS) is stand_in:
        del sys.modules[UTILS]


class _Loader(importlib.abc.Loader):
    """torchvision's own loader, run with the stand-in in place."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        stand_in = None
        if UTILS not in sys.modules:
            stand_in = _StandIn(UTILS, "stand-in until first use (dd.lazy_dynamo)")
            stand_in.is_compile_supported = is_compile_supported  # type: ignore[attr-defined]
            sys.modules[UTILS] = stand_in
        try:
            self._loader.exec_module(module)
        finally:
            if stand_in is not None:
                _remove_stand_in(stand_in)
            module.__loader__ = self._loader
            if module.__spec__ is not None:
                module.__spec__.loader = self._loader

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...: torchvision's loader's
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader of the top-level torchvision package, once."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "torchvision":
            return None
        uninstall()  # once: the stand-in is for torchvision's first import only
        spec = importlib.util.find_spec(fullname)  # by the finders after this one
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """From now on, the first `import torchvision` leaves torch._dynamo unimported (see the module's doc)."""
    with _lock:
        if "torchvision" in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
            return
        sys.meta_path.insert(0, _Finder())


def uninstall() -> None:
    with _lock:
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]
