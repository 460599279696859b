"""The linter runs with the tests, since CI runs only the README's test command (.ci/run): `ruff check` with
pyproject.toml's [tool.ruff] settings on the package, the benchmarks and the tests, failing with what it found."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing_in_the_package_benchmarks_and_tests():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "sortedchat", "benchmarks", "tests"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
