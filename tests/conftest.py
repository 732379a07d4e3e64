"""Shared fixtures. Helpers to import live in ``shared_paths`` (conftest modules share a name)."""

import pytest

from shared_paths import require_shared


@pytest.fixture
def shared_data():
    """Fixture form of :func:`shared_paths.require_shared`: ``shared_data("alpaca", "x.json")``."""
    return require_shared


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Llama-2 checkpoint, tokenizer and data (``recipe_utils.make_assets``), built once
    per test module. A module may define its own ``assets`` instead."""
    from recipe_utils import make_assets

    return make_assets(tmp_path_factory.mktemp("assets"))
