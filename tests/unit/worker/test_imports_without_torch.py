"""A worker of the null engine, and .ci/run's lowest-pins environment, have no torch: what they import
must not need it (the response encoders once imported the GPU mask module for their host RLE)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

MODULES = ["dd.worker.server", "dd.worker.core", "dd.worker.encoders.detector_v1", "dd.worker.encoders.kserve_v2",
           "dd.worker.engines.null", "dd.worker.engines.host_rle", "dd.frontend.server", "dd.supervisor"]


def test_the_serving_path_of_the_null_engine_imports_no_torch() -> None:
    code = ("import sys\n"
            "class NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' or name.startswith('torch.') or name == 'torchvision':\n"
            "            raise ImportError('no torch here: ' + name)\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            + "".join(f"import {m}\n" for m in MODULES) +
            "from dd.worker.encoders import encoder_for\n"
            "encoder_for('detector_v1'); encoder_for('kserve_v2')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
