"""Compiling the Triton kernels ahead (dd/worker/engines/kernels/preload.py): what runs without a GPU.

The compilation itself needs a GPU (BENCHMARKS.md, session 14, measured it on an H200); here: the shipped
manifest names kernels this package has, a manifest of another Triton version is ignored, a description
that cannot be compiled is counted as refused and never fails the caller (in the processes a start uses),
and the recording hook keeps this package's compilations only and restores Triton's hook.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dd.worker.engines.kernels import preload

triton = pytest.importorskip("triton")


def test_the_shipped_manifest_names_kernels_this_package_has() -> None:
    manifest = json.loads(preload.MANIFEST.read_text())
    assert manifest["triton"] and manifest["kernels"]
    for entry in manifest["kernels"]:
        kernel = getattr(importlib.import_module(entry["module"]), entry["name"])
        assert hasattr(kernel, "preload"), entry["name"]  # a Triton JITFunction
        assert json.loads(entry["data"])["name"].endswith(entry["name"])


def _manifest(tmp_path: Path, version: str, kernels: list[dict]) -> Path:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"triton": version, "kernels": kernels}))
    return path


def test_a_manifest_of_another_triton_is_ignored(tmp_path: Path) -> None:
    shipped = json.loads(preload.MANIFEST.read_text())["kernels"]
    assert preload.read_manifest(_manifest(tmp_path, "0.0.1", shipped)) == []
    assert preload.read_manifest(_manifest(tmp_path, triton.__version__, shipped)) == shipped
    assert preload.read_manifest(tmp_path / "absent.json") == []


def test_what_cannot_be_compiled_is_refused_in_each_process(tmp_path: Path) -> None:
    entries = [{"module": "dd.worker.engines.kernels.paste", "name": "no_such_kernel", "data": "{}"},
               {"module": "dd.no_such_module", "name": "k", "data": "{}"},
               {"module": "dd.worker.engines.kernels.rle", "name": "_mark_kernel", "data": '{"name": "other"}'}]
    done, refused, seconds = preload.preload(_manifest(tmp_path, triton.__version__, entries), processes=2)
    assert (done, refused) == (0, 3) and seconds >= 0


def test_the_command_runs_where_nothing_can_be_compiled(tmp_path: Path) -> None:
    path = _manifest(tmp_path, triton.__version__, [{"module": "dd.no_such_module", "name": "k", "data": "{}"}])
    out = subprocess.run([sys.executable, "-m", "dd.worker.engines.kernels.preload", "--manifest", str(path),
                          "--processes", "1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "preloaded 0 Triton kernels (1 refused)" in out.stderr


def test_recording_keeps_this_packages_compilations_and_restores_the_hook() -> None:
    knobs = triton.knobs.runtime
    before = knobs.jit_cache_hook
    with preload.recording() as entries:
        hook = knobs.jit_cache_hook
        assert hook is not before

        class Info:  # what Triton passes as `fn`
            def __init__(self, module: str, name: str) -> None:
                self.module, self.name = module, name

        assert hook(key="k", repr="r", fn=Info("dd.worker.engines.kernels.paste", "_paste_kernel"),
                    compile={"specialization_data": '{"name": "x"}'}, is_manual_warmup=False,
                    already_compiled=False) is False  # Triton compiles as usual
        hook(key="k", repr="r", fn=Info("someone.else", "kernel"), compile={"specialization_data": "{}"},
             is_manual_warmup=False, already_compiled=False)
    assert knobs.jit_cache_hook is before
    assert entries == [{"module": "dd.worker.engines.kernels.paste", "name": "_paste_kernel",
                        "data": '{"name": "x"}'}]


def test_the_description_names_this_tritons_libdevice() -> None:
    lib = Path(triton.__file__).parent / "backends" / "nvidia" / "lib" / "libdevice.10.bc"
    data = json.dumps({"name": "k", "options": {"extern_libs": [["libdevice", "/elsewhere/libdevice.10.bc"]]}})
    libs = json.loads(preload._local_paths(data))["options"]["extern_libs"]
    assert libs == [["libdevice", str(lib) if lib.exists() else "/elsewhere/libdevice.10.bc"]]


def test_once_all_are_compiled_later_runs_stop_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake(path: Path, processes: int) -> tuple[int, int, float]:
        calls.append(path)
        return results.pop(0)

    monkeypatch.setattr(preload, "preload", fake)
    results = [(12, 1, 1.0), (13, 0, 1.0)]
    assert preload.main(["--gpu", "NVIDIA H200"]) == 0  # one refused: no marker
    assert not preload.marker("NVIDIA H200").exists()
    assert preload.main(["--gpu", "NVIDIA H200"]) == 0  # all compiled: the marker
    assert preload.marker("NVIDIA H200").exists() and len(calls) == 2
    assert preload.main(["--gpu", "NVIDIA H200"]) == 0 and len(calls) == 2  # stopped at once
    assert not preload.marker("NVIDIA A100").exists()  # another GPU model compiles for itself
    assert preload.marker("NVIDIA H200").parent == tmp_path / "cache"


def test_the_supervisor_reads_whether_the_manifest_applies_without_importing_triton(tmp_path: Path) -> None:
    from importlib import metadata

    from dd.kernel_cache import manifest_applies

    installed = metadata.version("triton")
    assert manifest_applies(_manifest(tmp_path, installed, []))
    assert not manifest_applies(_manifest(tmp_path, "0.0.1", []))
    assert not manifest_applies(tmp_path / "absent.json")
    assert manifest_applies() == (json.loads(preload.MANIFEST.read_text())["triton"] == installed)


def test_the_supervisor_compiles_ahead_on_the_first_fast_engine_workers_gpu() -> None:
    from types import SimpleNamespace

    from dd.supervisor import WorkerPlan, kernel_preload_gpu

    models = [SimpleNamespace(name="tv", engine="torchvision"), SimpleNamespace(name="fast", engine="fast")]
    plans = [WorkerPlan("tv", 0, 0, []), WorkerPlan("fast", 0, None, []), WorkerPlan("fast", 1, 3, [])]
    assert kernel_preload_gpu(models, plans) == 3
    assert kernel_preload_gpu(models, plans[:2]) is None  # the fast engine's workers on the CPU only
    assert kernel_preload_gpu(models[:1], plans) is None  # no fast engine


def test_the_zygote_hashes_triton_beside_its_imports_only_for_a_fast_engine_on_a_gpu() -> None:
    from types import SimpleNamespace

    from dd.kernel_cache import TRITON_SELF_KEY
    from dd.supervisor import WorkerPlan, zygote_beside

    models = [SimpleNamespace(name="tv", engine="torchvision"), SimpleNamespace(name="fast", engine="fast")]
    plans = [WorkerPlan("tv", 0, 0, []), WorkerPlan("fast", 0, None, []), WorkerPlan("fast", 1, 3, [])]
    assert zygote_beside(models, plans) == [TRITON_SELF_KEY]
    assert zygote_beside(models, plans[:2]) == []  # the fast engine on the CPU: no Triton kernel runs
    assert zygote_beside(models[:1], plans) == []  # a torchvision engine on a GPU: none either
