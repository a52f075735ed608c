"""Tests that need ../shared/data skip in a user's fresh clone and fail under CI, where it must be present."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")


@pytest.mark.parametrize("ci, outcome", [("true", "1 error"), ("", "1 skipped")])
def test_missing_shared_data_skips_for_users_and_fails_under_ci(tmp_path, ci, outcome):
    tests = tmp_path / "clone" / "tests"  # no ../shared beside this clone
    tests.mkdir(parents=True)
    shutil.copy(CONFTEST, tests / "conftest.py")
    (tests / "test_needs_data.py").write_text("def test_reads(shared_data):\n    assert shared_data.is_dir()\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                         cwd=tests.parent, capture_output=True, text=True, env={**os.environ, "CI": ci})
    assert outcome in run.stdout, run.stdout
    assert ("CI must provide it" in run.stdout) == (ci == "true")
