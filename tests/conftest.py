"""Shared fixtures. Helpers to import live in ``shared_paths`` (conftest modules share a name)."""

import pytest

from shared_paths import require_shared


@pytest.fixture
def shared_data():
    """Fixture form of :func:`shared_paths.require_shared`: ``shared_data("alpaca", "x.json")``."""
    return require_shared
