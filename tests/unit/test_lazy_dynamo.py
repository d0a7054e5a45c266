"""dd.lazy_dynamo: the worker's imports leave torch._dynamo out, and torchvision behaves as before.

Each check runs in a fresh interpreter: what a module import pulls in is only visible there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_python(code: str) -> dict:
    """Runs code in a fresh interpreter from the repository root; its last stdout line is JSON."""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_zygotes_imports_for_the_fast_and_torchvision_engines_leave_torch_dynamo_out() -> None:
    """The zygote imports exactly worker_preload(...); torch._dynamo (1.2 s of 2.6 s on the CI box) is not among
    what that brings, while torch, torchvision and Triton are."""
    got = run_python(
        "import importlib, json, sys\n"
        "from dd.config.engines import REGISTRY\n"
        "from dd.zygote import worker_preload\n"
        "mods = [REGISTRY[e].target.partition(':')[0] for e in ('fast', 'torchvision')]\n"
        "for m in worker_preload(mods): importlib.import_module(m)\n"
        "import torchvision\n"
        "print(json.dumps({'dynamo': sorted(m for m in sys.modules if m.startswith('torch._dynamo')),\n"
        "  'sympy': 'sympy' in sys.modules, 'torchvision': 'torchvision.ops.roi_align' in sys.modules,\n"
        "  'triton': 'triton' in sys.modules,\n"
        "  'loader': type(torchvision.__spec__.loader).__module__, 'finders': [type(f).__module__ for f in sys.meta_path]}))")
    assert got["dynamo"] == [], "the stand-in is gone and nothing imported the real torch._dynamo"
    assert not got["sympy"]
    assert got["torchvision"] and got["triton"]
    # torchvision looks as it always does: its own loader; the import hook is gone once used.
    assert got["loader"] != "dd.lazy_dynamo"
    assert "dd.lazy_dynamo" not in got["finders"]


def test_torchvisions_roi_align_without_compiled_ops_calls_the_real_is_compile_supported() -> None:
    """torchvision calls is_compile_supported only when its compiled RoI Align cannot run; forced here (no
    compiled ops), the deferred function imports torch._dynamo and answers as the real one: the same
    output as the compiled op."""
    got = run_python(
        "import json, sys, torch\n"
        "import dd.models.build\n"
        "import torchvision.ops\n"
        "ra = sys.modules['torchvision.ops.roi_align']\n"
        "before = 'torch._dynamo' in sys.modules\n"
        "x = torch.rand(1, 2, 16, 16, generator=torch.Generator().manual_seed(0))\n"
        "boxes = torch.tensor([[0, 1.0, 2.0, 11.5, 9.0], [0, 0.0, 0.0, 15.0, 15.0]])\n"
        "compiled = ra.roi_align(x, boxes, (4, 4), 0.5, 2, True)\n"
        "ra._has_ops = lambda: False\n"
        "fallback = ra.roi_align(x, boxes, (4, 4), 0.5, 2, True)\n"
        "from torch._dynamo.utils import is_compile_supported as real\n"
        "print(json.dumps({'before': before, 'after': 'torch._dynamo' in sys.modules,\n"
        "  'same': ra.is_compile_supported('cpu') == real('cpu'),\n"
        "  'diff': float((compiled - fallback).abs().max()),\n"
        "  'real_utils': hasattr(sys.modules['torch._dynamo.utils'], 'counters')}))")
    assert got["before"] is False
    assert got["after"] is True, "the fallback path went through the deferred is_compile_supported"
    assert got["same"] and got["real_utils"]
    assert got["diff"] < 1e-5


def test_torch_compile_works_after_the_deferred_import() -> None:
    got = run_python(
        "import json, torch\n"
        "import dd.worker.engines.fast.engine\n"
        "import torch._dynamo\n"
        "f = torch.compile(lambda x: x * 2 + 1, backend='eager')\n"
        "print(json.dumps({'y': f(torch.ones(3)).tolist(), 'tv': torch._dynamo.utils.is_compile_supported('cpu')}))")
    assert got["y"] == [3.0, 3.0, 3.0]
    assert got["tv"] is True


def test_any_other_name_read_from_the_stand_in_imports_the_real_module() -> None:
    """A newer torchvision that imports more from torch._dynamo.utils (or torch._dynamo imported while
    torchvision's package runs) gets the real module: the old behaviour, only not faster."""
    got = run_python(
        "import json, sys, torch\n"
        "from dd import lazy_dynamo\n"
        "stand_in = lazy_dynamo._StandIn(lazy_dynamo.UTILS)\n"
        "stand_in.is_compile_supported = lazy_dynamo.is_compile_supported\n"
        "sys.modules[lazy_dynamo.UTILS] = stand_in\n"
        "from torch._dynamo.utils import counters\n"
        "import torch._dynamo\n"
        "print(json.dumps({'real': sys.modules[lazy_dynamo.UTILS] is not stand_in,\n"
        "  'same': counters is torch._dynamo.utils.counters}))")
    assert got == {"real": True, "same": True}


def test_install_does_nothing_once_torchvision_is_imported() -> None:
    got = run_python(
        "import json, sys, torchvision\n"
        "from dd import lazy_dynamo\n"
        "lazy_dynamo.install()\n"
        "print(json.dumps({'finders': [type(f).__module__ for f in sys.meta_path],\n"
        "  'dynamo': 'torch._dynamo' in sys.modules}))")
    assert "dd.lazy_dynamo" not in got["finders"]
    assert got["dynamo"] is True, "torchvision imported without the hook brings torch._dynamo, as it always did"
