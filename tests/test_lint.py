"""The code passes ruff with the project's ruff.toml (undefined and unused names, syntax errors, lines of at most 120
columns), so an unused import or a stray long line fails CI rather than a later reader."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_code_passes_ruff():
    pytest.importorskip("ruff", reason="ruff comes with the test extra: pip install -e '.[test]'")
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--config", str(ROOT / "ruff.toml"),
                        str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
