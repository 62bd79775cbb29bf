"""Fixtures of the data tests: small synthetic shards (the writer, ``write_shards``, is in tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory, write_shards):
    """``(folder, studies)``: 60 studies in 8 shards, fixed seed."""
    root = tmp_path_factory.mktemp("shards")
    return root, write_shards(root, 60, seed=7)
