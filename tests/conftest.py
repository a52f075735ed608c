from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def require_shared_data() -> Path:
    """The real files beside the project (../shared/data).

    Where the folder is absent (a user's fresh clone) the calling test skips with the reason; under CI
    (``CI=true``), where the folder is always laid beside the clone, its absence fails the test instead.
    """
    if not SHARED_DATA.is_dir():
        reason = f"real test data not found at {SHARED_DATA} (a fresh clone has no ../shared/data)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason + "; CI must provide it", pytrace=False)
        pytest.skip(reason)
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``require_shared_data()`` as a fixture, for tests whose every assertion uses the real files."""
    return require_shared_data()
