"""Fixtures of the sweep tests: small shards, the shipped search spaces, a short-run sweep config.

The shards come from the data tests' writer (``write_shards`` in ``tests/conftest.py``: shard schema (docs/architecture.md), known
contents); the search spaces are ``mama_ray.search_spaces``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mama_ray import config, search_spaces

REPO = Path(__file__).parents[2]


def short_run(shards: str, run_dir: str) -> dict:
    """Overrides for a 1-worker run of 4 steps with a Tune result at every step (no evaluation)."""
    return {"data.shards": shards, "storage.run_dir": run_dir, "scaling.num_workers": 1,
            "train.max_steps": 4, "train.log_every": 1, "train.checkpoint_every": 4,
            "train.micro_batch_size": 4, "optim.warmup_steps": 1, "loss.late_loss_step": 2,
            "tune.grace_period": 1, "tune.reduction_factor": 2, "tune.max_concurrent": 1}


@pytest.fixture(scope="session")
def short_overrides():
    """:func:`short_run` (conftest modules are not importable under --import-mode=importlib)."""
    return short_run


@pytest.fixture(scope="session")
def spaces():
    """The ``mama_ray.search_spaces`` module."""
    return search_spaces


@pytest.fixture(scope="session")
def tune_shards(tmp_path_factory, write_shards) -> str:
    """24 synthetic studies (48-px images) as shards; returns the folder."""
    root = tmp_path_factory.mktemp("tune_shards")
    write_shards(root, 24, seed=3)
    return str(root)


@pytest.fixture
def sweep_cfg(tune_shards, tmp_path):
    """``tiny_tune`` cut to a 4-step, 1-worker run under ``tmp_path/runs``."""
    return config.load("tiny_tune", short_run(tune_shards, str(tmp_path / "runs")))
