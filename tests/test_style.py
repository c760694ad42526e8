"""The code passes ruff (ruff.toml: pycodestyle, pyflakes, import order; lines of at most 100 characters,
120 for strings and regexes that cannot be split)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUFF = [sys.executable, "-m", "ruff"]


@pytest.fixture(scope="module")
def ruff():
    if subprocess.run([*RUFF, "--version"], capture_output=True).returncode != 0:
        pytest.fail("ruff is not installed (it is in requirements.txt)")
    return RUFF


def test_ruff_lint(ruff):
    proc = subprocess.run([*ruff, "check", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_reports_a_long_line(ruff, tmp_path):
    shutil.copy(REPO / "ruff.toml", tmp_path / "ruff.toml")
    (tmp_path / "long.py").write_text(f"x = '{'a' * 130}'\n")
    proc = subprocess.run([*ruff, "check", "."], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0 and "E501" in proc.stdout
