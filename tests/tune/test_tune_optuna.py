"""``tune.search=optuna``: a seeded Optuna (TPE) sweep of 3 tiny trials under ASHA.

TPE's first trials are random samples from its seeded sampler, so the three configs the sweep
ran must be exactly those an Optuna study with ``TPESampler(seed=run.seed)`` asks for first,
in the space Ray Tune converts ``tiny`` to.
"""

import math

import optuna
import pytest
from ray.tune.search.optuna import OptunaSearch

from mama_ray import config
from mama_ray.config import ConfigError
from mama_ray.sweep import run_sweep, searcher

pytestmark = pytest.mark.integration


def expected_samples(space: dict, seed: int, n: int) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed), direction="minimize")
    out = []
    for _ in range(n):
        trial = study.ask(fixed_distributions=OptunaSearch.convert_search_space(space))
        out.append(dict(trial.params))
        study.tell(trial, 1.0)  # values do not move the first (random) samples
    return out


def test_optuna_sweep_runs_three_seeded_trials(ray_session, sweep_cfg, spaces):
    cfg = config.override(sweep_cfg, {"tune.search": "optuna", "tune.num_samples": 3,
                                      "train.max_steps": 1, "train.checkpoint_every": 1,
                                      "loss.late_loss_step": 1})
    space = spaces.get_space("tiny")
    out = run_sweep(cfg, space)
    assert len(out.rows) == 3 and all(math.isfinite(r[cfg.tune.metric]) for r in out.rows)
    ran = sorted((r["optim.lr"], r["loss.mv_weight"], r["model.lora.r"]) for r in out.rows)
    want = sorted((s["optim.lr"], s["loss.mv_weight"], s["model.lora.r"]) for s in expected_samples(space, 42, 3))
    assert ran == want  # the same floats: Tune passes Optuna's samples through unchanged
    assert len(set(ran)) == 3


def test_optuna_refuses_a_grid(sweep_cfg):
    cfg = config.override(sweep_cfg, {"tune.search": "optuna"})
    with pytest.raises(ConfigError, match="'tune.search': optuna cannot search the grid of loss.clip_weight"):
        searcher(cfg, {"loss.clip_weight": {"grid_search": [1.0, 2.0]}})
