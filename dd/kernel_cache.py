"""Where Triton keeps compiled kernels, and the marker that says the fast engine's are all there.

Stdlib only: the supervisor reads the marker before deciding to start the kernel preload
(dd/worker/engines/kernels/preload.py), without importing the engines (numpy, torch) on its way to
starting everything else.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path

# The fast engine's Triton kernels as a load compiles them (written by preload.py --record).
MANIFEST = Path(__file__).resolve().parent / "worker" / "engines" / "kernels" / "manifest.json"

# Triton's key of itself: the hash of its own sources and library that every lookup in its kernel cache
# starts with, computed once per process (functools.lru_cache). The zygote computes it beside its imports
# (dd.zygote, `beside`) so that the workers forked from it skip it.
TRITON_SELF_KEY = "triton.runtime.cache:triton_key"


def triton_cache_dir() -> Path:
    """Where Triton keeps its compiled kernels: TRITON_CACHE_DIR, else TRITON_HOME (or home)/.triton/cache."""
    given = os.environ.get("TRITON_CACHE_DIR")
    if given:
        return Path(given)
    return Path(os.environ.get("TRITON_HOME") or Path.home()) / ".triton" / "cache"


def manifest_applies(manifest: Path = MANIFEST) -> bool:
    """Whether the manifest may serve the Triton installed here, told from the installed package's metadata
    without importing it: False for another version (its descriptions would be refused one by one) or no
    manifest; True where the metadata does not say (a Triton under another distribution name), for the
    preload itself to check against triton.__version__."""
    try:
        recorded = json.loads(manifest.read_text()).get("triton")
    except (OSError, ValueError):
        return False
    if not recorded:
        return False
    try:
        installed = metadata.version("triton")
    except metadata.PackageNotFoundError:
        return True
    return recorded.split("+")[0] == installed.split("+")[0]


def marker(gpu: str, manifest: Path = MANIFEST) -> Path:
    """The file that says `manifest`'s kernels are in Triton's cache for GPUs of model `gpu`."""
    try:
        content = manifest.read_bytes()
    except OSError:
        content = b""
    digest = hashlib.sha256(content + b"\0" + gpu.encode()).hexdigest()[:20]
    return triton_cache_dir() / f"deep-detection-kernels-{digest}.done"
