"""Compiling the Triton kernels a load will need before it needs them, several at once.

On a machine whose Triton cache is empty, a fast engine's load compiles each of its kernels as the
warm-up first launches it, one after the other (on an H200 host the load took 8.5-11.9 s cold against
2.5-2.7 s with the cache kept: BENCHMARKS.md, S13-5 and S13-6). Triton can compile a kernel from the
description of one launch's specialization (the argument types, which integers equal 1 or divide by
16, the constexprs, the compile options: `JITFunction.preload`), and its on-disk cache is shared by
every process of a user. So:

  - `recording()` collects those descriptions for this package's kernels while an engine loads
    (Triton's JIT cache hook, called on every compilation, the cached ones included);
  - a manifest of them ships with the package (manifest.json beside this file, written by
    `python -m dd.worker.engines.kernels.preload --record` on a GPU), keyed by Triton's version;
  - `preload()` compiles the manifest's kernels in several processes into the cache, while the
    supervisor's zygote imports torch, so that the worker's load then finds them there.

Once every kernel of the manifest has been compiled for a GPU model, a marker in Triton's cache says so,
and later starts skip the preload (which otherwise costs its processes' imports and CUDA contexts: on
an H200 host a start with a warm cache took 1.3 s longer with it than without; BENCHMARKS.md, S14).

Nothing here is needed for correctness: a kernel the manifest lacks, or one whose description this
Triton or GPU cannot use (another version, another architecture: preload refuses it), is compiled at
its first launch as before, and the compiled code is the same either way (the cache key is the
description's). A warm cache makes each preload a lookup.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from dd.kernel_cache import MANIFEST, marker

log = logging.getLogger("dd.kernels")

PACKAGE = "dd.worker.engines.kernels"


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


@contextmanager
def recording() -> Iterator[list[dict[str, str]]]:
    """Collects, while the block runs, each compilation of this package's kernels: {"module", "name",
    "data"} with Triton's serialized specialization (what JITFunction.preload takes)."""
    import triton

    entries: list[dict[str, str]] = []

    def hook(*args: Any, **kwargs: Any) -> bool:
        fn, compile_ = kwargs.get("fn"), kwargs.get("compile") or {}
        jit = getattr(fn, "jit_function", fn)
        module = getattr(fn, "module", None) or getattr(jit, "__module__", "")
        name = getattr(jit, "__name__", None) or getattr(fn, "name", "")
        data = compile_.get("specialization_data")
        if data and module.startswith(PACKAGE):
            entries.append({"module": module, "name": name.rsplit(".", 1)[-1], "data": data})
        return False  # compile as usual

    knobs = getattr(getattr(triton, "knobs", None), "runtime", None)
    if knobs is not None and hasattr(knobs, "jit_cache_hook"):
        before = knobs.jit_cache_hook
        knobs.jit_cache_hook = hook
        try:
            yield entries
        finally:
            knobs.jit_cache_hook = before
        return
    from triton.runtime.jit import JITFunction  # Triton before knobs (3.3)

    before = JITFunction.cache_hook
    JITFunction.cache_hook = hook
    try:
        yield entries
    finally:
        JITFunction.cache_hook = before


def write_manifest(entries: list[dict[str, str]], path: Path = MANIFEST) -> int:
    """Writes the distinct entries, with this Triton's version; returns how many."""
    distinct = list({e["data"]: e for e in entries}.values())
    path.write_text(json.dumps({"triton": _triton_version(), "kernels": distinct}, indent=1) + "\n")
    return len(distinct)


def read_manifest(path: Path = MANIFEST) -> list[dict[str, str]]:
    """The manifest's entries if it was written by this Triton version, else none (its descriptions'
    format changes between versions)."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if manifest.get("triton") != _triton_version():
        return []
    return list(manifest.get("kernels", []))


def _local_paths(data: str) -> str:
    """The description with its extern libraries (libdevice) at this Triton's own paths: the manifest
    names the files of the machine that recorded it."""
    spec = json.loads(data)
    libs = (spec.get("options") or {}).get("extern_libs")
    if not libs:
        return data
    import triton

    here = Path(triton.__file__).parent / "backends" / "nvidia" / "lib"
    spec["options"]["extern_libs"] = [[name, str(here / Path(path).name) if (here / Path(path).name).exists()
                                       else path] for name, path in libs]
    return json.dumps(spec)


def preload_entries(entries: list[dict[str, str]]) -> tuple[int, int]:
    """Compiles (or finds in the cache) each entry's kernel in this process: (done, refused). Refused: a
    kernel this package no longer has, or a description for another GPU or Triton."""
    done = refused = 0
    for entry in entries:
        try:
            kernel = getattr(importlib.import_module(entry["module"]), entry["name"])
            compiled = kernel.preload(_local_paths(entry["data"]))
            # Loads it and builds its launcher (a C stub Triton compiles per signature, cached beside it).
            init = getattr(compiled, "_init_handles", None)
            if init is not None:
                init()
            done += 1
        except Exception as exc:  # noqa: BLE001 - whatever the reason, its first launch compiles it
            log.debug("kernel %s.%s not preloaded: %s", entry.get("module"), entry.get("name"), exc)
            refused += 1
    return done, refused


def preload(path: Path = MANIFEST, processes: int = 0) -> tuple[int, int, float]:
    """Compiles the manifest's kernels into Triton's cache in up to `processes` processes at once
    (0: one per 2 cores, at most 8): (done, refused, seconds)."""
    t0 = time.perf_counter()
    entries = read_manifest(path)
    if not entries:
        return 0, 0, time.perf_counter() - t0
    n = min(len(entries), processes if processes > 0 else max(1, min(8, (os.cpu_count() or 2) // 2)))
    shares = [entries[k::n] for k in range(n)]
    if n == 1:
        done, refused = preload_entries(entries)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(preload_entries, shares))
        done, refused = sum(r[0] for r in results), sum(r[1] for r in results)
    return done, refused, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compile the fast engine's Triton kernels into Triton's cache ahead "
                                             "of a load (or, with --record, write the manifest of them).")
    ap.add_argument("--manifest", type=Path, default=MANIFEST)
    ap.add_argument("--processes", type=int, default=0, help="0: one per 2 cores, at most 8")
    ap.add_argument("--parent-pid", type=int, help="exit when this process (the supervisor) does")
    ap.add_argument("--gpu", default="", help="the GPU model compiled for: once all are compiled, later runs "
                                              "for it stop at once (a marker in Triton's cache)")
    ap.add_argument("--record", metavar="MODEL_FOLDER", type=Path,
                    help="load this model's fast engine on the GPU and write the kernels it compiles to --manifest")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [kernels] %(message)s")
    if args.parent_pid:
        from dd.procutil import die_with_parent

        die_with_parent(args.parent_pid)
    if args.record is not None:
        from dd.config import load_model_config
        from dd.worker.engines import load_engine

        with recording() as entries:
            load_engine(load_model_config(args.record), "cuda:0").close()
        log.info("wrote %d kernel descriptions to %s", write_manifest(entries, args.manifest), args.manifest)
        return 0
    done_marker = marker(args.gpu, args.manifest)
    if done_marker.exists():
        log.info("the Triton kernels are compiled already (%s)", done_marker)
        return 0
    done, refused, seconds = preload(args.manifest, args.processes)
    log.info("preloaded %d Triton kernels (%d refused) in %.1f s", done, refused, seconds)
    if done and not refused:
        try:
            done_marker.parent.mkdir(parents=True, exist_ok=True)
            done_marker.write_text(f"{done} kernels\n")
        except OSError as exc:
            log.debug("cannot write %s: %s", done_marker, exc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
