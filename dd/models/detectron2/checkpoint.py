"""Mask R-CNN weights read safely, and their format recognised by their parameter names.

The users' files come in three containers:

- a detectron2 trainer checkpoint (DetectionCheckpointer.save): ``{"model": state_dict,
  "trainer": ..., "iteration": ..., "optimizer"/"scheduler": ...}``, written by torch.save;
- a bare state dict (torch.save of model.state_dict()), maybe wrapped as ``{"model": ...}`` or
  ``{"state_dict": ...}``, maybe with DataParallel's ``module.`` prefix;
- a detectron2 model-zoo ``.pkl``: a plain pickle of ``{"model": {name: numpy array}, "__author__": ...}``.

and two naming schemes: detectron2's (``backbone.bottom_up.stem.conv1.weight``,
``proposal_generator.rpn_head...``) and torchvision's (``backbone.body.conv1.weight``, ``rpn.head...``).

Nothing in a file is ever executed. torch files are read with ``torch.load(weights_only=True)``;
where a trainer checkpoint's non-weight state holds objects that weights_only refuses (a custom
scheduler, numpy scalars), each such class is replaced by an inert placeholder (it stores
nothing and runs nothing) and only the ``model`` entry is used; names of modules that run code
(``os.system``, ``builtins.eval``, ``subprocess``, ...) mark a malicious file, which is refused outright. A
plain pickle is read by an unpickler that can build only numpy arrays, dtypes and plain containers.

``sniff_weights_format`` tells the naming scheme without torch, from the pickle's strings alone
(pickletools, which only parses), so that configuration checks before any process starts stay light.
"""

from __future__ import annotations

import collections
import io
import logging
import pickle
import pickletools
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from dd.config import ConfigError

log = logging.getLogger(__name__)

WEIGHTS_FORMATS = ("auto", "detectron2", "torchvision")
DETECTRON2_PREFIXES = ("backbone.bottom_up.", "proposal_generator.", "backbone.fpn_lateral", "backbone.fpn_output")
TORCHVISION_PREFIXES = ("backbone.body.", "backbone.fpn.inner_blocks", "backbone.fpn.layer_blocks", "rpn.head.")
# Keys of a detectron2 trainer checkpoint besides "model".
TRAINER_KEYS = ("trainer", "iteration", "optimizer", "scheduler")
# torch.save's legacy (non-zip) format starts with this number, pickled.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# Modules whose names in a checkpoint mean it was made to run code when unpickled (a training state holds
# numbers and classes of its own): such a file is refused outright, though placeholders would defuse it.
_SUSPICIOUS_MODULES = frozenset("""os posix nt subprocess sys builtins __builtin__ importlib shutil socket pickle
_pickle marshal runpy code codeop pty ctypes types operator functools io _io webbrowser multiprocessing
threading signal tempfile glob inspect pdb platform site sysconfig asyncio http urllib requests""".split())
_PLAUSIBLE_BUILTINS = ("set", "frozenset", "slice", "range", "complex", "bytearray", "object")


class WeightsError(ConfigError):
    """A weights file that cannot be read or used, worded for the person who provided it."""


def format_of_keys(keys: Any) -> str | None:
    """'detectron2' or 'torchvision' from a state dict's parameter names; None when neither."""
    d2 = tv = False
    for k in keys:
        if not isinstance(k, str):
            continue
        k = k[len("module."):] if k.startswith("module.") else k
        d2 = d2 or k.startswith(DETECTRON2_PREFIXES)
        tv = tv or k.startswith(TORCHVISION_PREFIXES)
    if d2 != tv:
        return "detectron2" if d2 else "torchvision"
    return None


# -- sniffing without torch --------------------------------------------------------------------------

def _pickle_strings(stream: BinaryIO, limit: int) -> Iterator[str]:
    """The string constants of one pickle, in order, by parsing its opcodes (nothing is built)."""
    try:
        for n, (op, arg, _) in enumerate(pickletools.genops(stream)):
            if isinstance(arg, str):
                yield arg
            elif isinstance(arg, bytes) and op.name in ("BINSTRING", "SHORT_BINSTRING") and len(arg) < 256:
                yield arg.decode("latin-1")
            if n > limit:
                return
    except (ValueError, EOFError, UnicodeDecodeError, pickle.UnpicklingError):
        return


def _pickles_of(path: Path) -> Iterator[BinaryIO]:
    """The pickle streams that hold a weights file's names: a torch zip's data.pkl, else the file's own."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("data.pkl")]
            if names:
                with zf.open(names[0]) as f:
                    yield f
        return
    with open(path, "rb") as f:
        yield f


def sniff_weights_format(path: Path | str, limit: int = 2_000_000) -> str | None:
    """'detectron2' / 'torchvision' from the parameter names in a weights file, without torch or unpickling.

    Reads the pickle opcodes' string arguments (a legacy torch file holds several pickles in a row;
    the names are in the last of the first four) and stops at the first name that decides.
    """
    path = Path(path)
    try:
        for stream in _pickles_of(path):
            for _ in range(4):  # legacy torch files: magic, protocol, sys info, then the object
                for s in _pickle_strings(stream, limit):
                    fmt = format_of_keys([s])
                    if fmt is not None:
                        return fmt
                if stream.read(1) == b"":
                    break
                stream.seek(-1, io.SEEK_CUR)
    except (OSError, zipfile.BadZipFile):
        return None
    return None


# -- reading -----------------------------------------------------------------------------------------

@dataclass
class Weights:
    """A weights file's parameters, unwrapped, and what they were found to be."""

    format: str | None  # "detectron2" or "torchvision" by the names; None when neither is recognised
    container: str  # in words, for `inspect` and errors
    state: dict[str, Any]  # name -> torch.Tensor
    notes: list[str] = field(default_factory=list)


class _Placeholder:
    """Stands in for a class a checkpoint names outside its weights (trainer state): runs nothing, keeps nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Placeholder":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


def _plausible(name: str) -> bool:
    module, _, attr = name.rpartition(".")
    if module in ("builtins", "__builtin__"):
        return attr in _PLAUSIBLE_BUILTINS
    return module.split(".")[0] not in _SUSPICIOUS_MODULES


def _torch_load(path: Path) -> tuple[Any, list[str]]:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True), []
    except pickle.UnpicklingError as first:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # noqa: BLE001 - not statically readable: report the first error
            names = []
        if not names:
            raise WeightsError(f"{path}: cannot be read safely as weights ({first})") from first
        bad = [n for n in names if not _plausible(n)]
        if bad:
            raise WeightsError(f"{path}: refers to {', '.join(bad)}, which no weights file needs; it may run code "
                               "when loaded, so it is refused. Save only the model: torch.save("
                               "model.state_dict(), 'model.pth')") from first
        stubs = [(type(n.rpartition(".")[2], (_Placeholder,), {"__module__": __name__}), n) for n in names]
        with torch.serialization.safe_globals(stubs):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        note = (f"{len(names)} non-weight class(es) in the file ({', '.join(names)}) were read as inert "
                "placeholders; only the model's tensors are used")
        log.info("%s: %s", path, note)
        return obj, [note]


class _ArrayUnpickler(pickle.Unpickler):
    """Builds numpy arrays, dtypes, scalars and plain containers; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        import numpy as np

        core = getattr(np, "_core", None) or np.core
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): core.multiarray._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): core.multiarray._reconstruct,
            ("numpy.core.multiarray", "scalar"): core.multiarray.scalar,
            ("numpy._core.multiarray", "scalar"): core.multiarray.scalar,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("collections", "OrderedDict"): collections.OrderedDict,
        }
        obj = allowed.get((module, name))
        if obj is None and module.startswith("numpy") and name.endswith("DType"):
            obj = getattr(np.dtypes, name, None)  # numpy 2 pickles name dtype classes (numpy.dtypes.Float32DType)
        if obj is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights pickle")
        return obj


def _pickle_load(path: Path) -> Any:
    with open(path, "rb") as f:
        try:
            return _ArrayUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as exc:
            raise WeightsError(f"{path}: is not a weights pickle this server reads safely ({exc}); detectron2 "
                               "model-zoo .pkl files hold only numpy arrays") from exc
        except (EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
            raise WeightsError(f"{path}: cannot be read as weights ({type(exc).__name__}: {exc})") from exc


def _is_torch_file(path: Path) -> bool:
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        try:
            ops = pickletools.genops(f)
            first = [arg for _, arg, _ in (next(ops), next(ops))]
        except (StopIteration, ValueError, EOFError):
            return False
    return _TORCH_LEGACY_MAGIC in first


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, Any], str]:
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict (a mapping of parameter names "
                           "to tensors)")
    if isinstance(obj.get("model"), dict):
        extra = [k for k in TRAINER_KEYS if k in obj]
        if extra:
            what = f"detectron2 trainer checkpoint (model + {', '.join(extra)})"
        elif "__author__" in obj:
            what = f"model-zoo checkpoint ({obj['__author__']})"
        else:
            what = "state dict wrapped as {'model': ...}"
        return obj["model"], what
    if isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"], "state dict wrapped as {'state_dict': ...}"
    return obj, "bare state dict"


def read_weights(path: Path | str) -> Weights:
    """The parameters in a weights file, as float32/int tensors keyed by name (module. prefixes removed)."""
    import numpy as np
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    notes: list[str] = []
    try:
        torch_file = _is_torch_file(path)
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read ({exc.strerror})") from exc
    if torch_file:
        obj, notes = _torch_load(path)
    else:
        obj = _pickle_load(path)
    raw, container = _unwrap(obj, path)
    if not torch_file:
        container += ", numpy pickle"
    state: dict[str, Any] = {}
    for k, v in raw.items():
        if not isinstance(k, str):
            raise WeightsError(f"{path}: parameter names must be strings, found {k!r}")
        if k.startswith("module."):
            k = k[len("module."):]
        if isinstance(v, np.ndarray):
            if v.dtype.hasobject:
                raise WeightsError(f"{path}: parameter {k!r} is an array of Python objects, not numbers")
            v = torch.from_numpy(np.ascontiguousarray(v))
        if not isinstance(v, torch.Tensor):
            raise WeightsError(f"{path}: parameter {k!r} is a {type(v).__name__}, not a tensor")
        state[k] = v.float() if v.is_floating_point() else v
    fmt = format_of_keys(state)
    if fmt is None and any(k.endswith(("_w", "_b")) and "." not in k for k in state):
        notes.append("names look like Detectron1/Caffe2 ('conv1_w'), which this server does not convert")
    return Weights(fmt, container, state, notes)
