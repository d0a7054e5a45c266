"""Code run in a fresh interpreter from the repository's root, for what one process can see only once
(its first imports, its first calls)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_fresh(code: str, *args: str) -> str:
    """`python -c code args...`'s stdout, stripped; fails the test with its stderr if it fails."""
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()
