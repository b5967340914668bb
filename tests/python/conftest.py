import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.fixture(scope="session")
def nzp():
    """Path of the nzp binary under test (env NZP, default build/nzp)."""
    path = os.environ.get("NZP", os.path.join(REPO, "build", "nzp"))
    if not os.access(path, os.X_OK):
        pytest.fail(f"nzp binary not found at {path}: run `make` first")
    return path
