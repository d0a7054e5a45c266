"""The generated code in dd/proto must be what scripts/compile_protos.sh makes from protos/ now."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    work = tmp_path / "repo"
    work.mkdir()
    shutil.copytree(REPO / "protos", work / "protos")
    shutil.copytree(REPO / "scripts", work / "scripts")
    subprocess.run(["bash", "scripts/compile_protos.sh"], cwd=work, check=True,
                   env={**os.environ, "PYTHON": sys.executable})
    fresh, current = work / "dd" / "proto", REPO / "dd" / "proto"
    fresh_files = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    current_files = sorted(p.relative_to(current) for p in current.rglob("*")
                           if p.is_file() and "__pycache__" not in p.parts)
    assert fresh_files == current_files, "dd/proto is stale: run scripts/compile_protos.sh"
    stale = [str(p) for p in fresh_files if not filecmp.cmp(fresh / p, current / p, shallow=False)]
    assert not stale, f"dd/proto is stale ({stale}): run scripts/compile_protos.sh"
