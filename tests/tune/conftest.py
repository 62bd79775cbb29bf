"""Fixtures of the sweep tests: small shards, the shipped search spaces, a short-run sweep config.

The shards come from the data tests' writer (``tests/data/conftest.py``: shard schema (docs/architecture.md), known
contents); ``tune/search_spaces.py`` is loaded by path, as ``tune/sweep.py`` is a script folder,
not a package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mama_ray import config

REPO = Path(__file__).parents[2]


def load_by_path(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    """The ``tune/search_spaces.py`` module."""
    return load_by_path("mama_search_spaces", REPO / "tune" / "search_spaces.py")


@pytest.fixture(scope="session")
def tune_shards(tmp_path_factory) -> str:
    """24 synthetic studies (48-px images) as shards; returns the folder."""
    make_shards = load_by_path("mama_test_data_fixtures", REPO / "tests" / "data" / "conftest.py").make_shards
    root = tmp_path_factory.mktemp("tune_shards")
    make_shards(root, 24, seed=3)
    return str(root)


@pytest.fixture
def sweep_cfg(tune_shards, tmp_path):
    """``tiny_tune`` cut to a 4-step, 1-worker run under ``tmp_path/runs``."""
    return config.load("tiny_tune", short_run(tune_shards, str(tmp_path / "runs")))
