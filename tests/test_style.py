"""The code stays ruff-clean (lint and format), so CI catches style drift like any other failure."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    return subprocess.run([exe, *args, "src", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True)


def test_ruff_lint():
    proc = ruff("check")
    assert proc.returncode == 0, proc.stdout


def test_ruff_format():
    proc = ruff("format", "--check")
    assert proc.returncode == 0, proc.stdout
