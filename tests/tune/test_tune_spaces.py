"""Search spaces and the sweep's bookkeeping, without Ray: field names, ranges, places, table, ranking."""

import math
from pathlib import Path

import pytest
from ray import tune

from mama_ray import config
from mama_ray.config import ConfigError, check_tune_settings
from mama_ray.sweep import (
    best_config,
    check_space,
    check_sweep,
    csv_table,
    markdown_table,
    rank_rows,
    report_count,
    sweep_uri,
    trial_config,
)

REPO = Path(__file__).parents[2]


@pytest.mark.parametrize("preset", ["tiny_tune", "base"])
def test_every_space_names_real_fields(spaces, preset):
    """Every key of every shipped space is a config field and its draws pass the config's checks."""
    cfg = config.load(preset)
    assert set(spaces.SPACES) >= {"loss_weights", "lora", "lr", "paper", "tiny"}
    for space in spaces.SPACES.values():
        for _ in range(10):
            check_space(cfg, space)


def test_paper_space_covers_the_issue(spaces):
    paper = spaces.get_space("paper")
    assert set(paper) == {"loss.clip2_weight", "loss.mv_weight", "loss.sla_weight", "loss.late_loss_step",
                          "model.lora.r", "model.lora.alpha", "optim.lr"}
    ranks = {paper["model.lora.r"].sample() for _ in range(200)}
    assert ranks == {4, 8, 16, 32, 64}  # LoRA rank 4–64
    lrs = [paper["optim.lr"].sample() for _ in range(200)]
    assert all(1e-5 <= v <= 2e-4 for v in lrs)


def test_bad_space_names_the_field():
    cfg = config.load("tiny_tune")
    with pytest.raises(ConfigError, match="loss.mv_weigth"):
        check_space(cfg, {"loss.mv_weigth": tune.uniform(0, 1)})
    with pytest.raises(ConfigError, match="model.lora.r"):
        check_space(cfg, {"model.lora.r": tune.grid_search([8, 4.5])})  # a rank must be an integer
    with pytest.raises(ConfigError, match="empty"):
        check_space(cfg, {})


def test_unknown_space_lists_names(spaces):
    with pytest.raises(ConfigError, match="loss_weights, lora, lr, paper, tiny"):
        spaces.get_space("weights")


def test_tune_settings_are_checked():
    with pytest.raises(ConfigError, match="train.eval_at_end"):
        check_tune_settings(config.load("tiny_tune", {"tune.metric": "zero_shot_birads_balanced_accuracy"}))
    with pytest.raises(ConfigError, match="tune.reduction_factor"):
        check_tune_settings(config.load("tiny_tune", {"tune.reduction_factor": 1}))
    with pytest.raises(ConfigError, match="'tune.metric'.*train.val_every"):
        check_tune_settings(config.load("tiny_tune", {"train.val_every": 0}))  # val_clip_loss, never reported
    with pytest.raises(ConfigError, match="'tune.metric'.*val_i2t_r1"):
        check_tune_settings(config.load("tiny_tune", {"tune.metric": "val_r1"}))
    check_tune_settings(config.load("tiny_tune"))  # the default sweep is fine


@pytest.mark.parametrize("metric", ["loss", "val_loss"])
def test_weighted_metric_with_weight_space_is_refused(spaces, metric):
    cfg = config.load("base", {"tune.metric": metric})
    with pytest.raises(ConfigError, match=r"config field 'tune.metric'.*loss.mv_weight.*val_clip_loss"):
        check_sweep(cfg, spaces.get_space("loss_weights"))
    check_sweep(cfg, spaces.get_space("lora"))  # no weight varies: a weighted total compares
    check_sweep(config.load("base"), spaces.get_space("loss_weights"))  # default metric: val_clip_loss


def test_sweep_cli_refuses_weighted_metric_before_starting(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, str(REPO / "tune" / "sweep.py"), "--space", "loss_weights",
                          "--set", "tune.metric=loss", "--set", f"storage.run_dir={tmp_path}"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "config field 'tune.metric'" in out.stderr and "val_clip_loss" in out.stderr
    assert not any(tmp_path.iterdir())  # nothing started, nothing written


NO_VAL = {"train.val_every": 0}


@pytest.mark.parametrize(("over", "want"), [
    ({}, 6),  # 12 steps, a report (and a validation) every 2 (the last is also the checkpoint)
    ({"train.max_steps": 10, "train.log_every": 3, "train.checkpoint_every": 4, **NO_VAL}, 6),  # 3 4 6 8 9 10
    ({"train.max_steps": 10, "train.log_every": 3, "train.checkpoint_every": 4, "train.stop_at_step": 5, **NO_VAL}, 3),
    ({"train.max_steps": 10, "train.log_every": 3, "train.checkpoint_every": 4, "train.val_every": 5}, 7),  # + 5
    ({"train.max_steps": 10, "train.log_every": 3, "train.checkpoint_every": 4, "train.stop_at_step": 5}, 4),  # 2 3 4 5
])
def test_report_count(over, want):
    assert report_count(config.load("tiny_tune", over)) == want


def test_places_and_configs():
    cfg = config.load("tiny_tune", {"storage.run_dir": "/data/runs", "run.name": "exp", "tune.space": "lora"})
    sweep = sweep_uri(cfg)
    assert sweep == "/data/runs/exp-sweep-lora"
    trial = trial_config(config.to_dict(cfg), {"model.lora.r": 16, "optim.lr": 2e-4}, sweep, "ab12_00003")
    assert (trial.storage.run_dir, trial.run.name) == ("/data/runs/exp-sweep-lora/runs", "ab12_00003")
    assert (trial.model.lora.r, trial.optim.lr) == (16, 2e-4)
    best = best_config(cfg, {"model.lora.r": 32})
    assert (best.run.name, best.storage.run_dir, best.model.lora.r) == ("exp-sweep-lora-best", "/data/runs", 32)
    assert config.from_dict(config.to_dict(best)) == best


ROWS = [
    {"trial": "a", "status": "stopped early", "reports": 1, "step": 1, "loss": 0.5, "optim.lr": 1e-3},
    {"trial": "b", "status": "complete", "reports": 4, "step": 4, "loss": 2.0, "optim.lr": 2e-3},
    {"trial": "c", "status": "error", "reports": 0, "step": 0, "loss": math.nan, "optim.lr": 3e-3},
    {"trial": "d", "status": "complete", "reports": 4, "step": 4, "loss": 1.5, "optim.lr": 4e-3},
]


def test_ranking_prefers_complete_trials():
    assert [r["trial"] for r in rank_rows(ROWS, "loss", "min")] == ["d", "b", "a", "c"]
    assert [r["trial"] for r in rank_rows(ROWS, "loss", "max")] == ["b", "d", "a", "c"]


def test_tables():
    rows = ROWS[:2]
    assert markdown_table(rows) == (
        "| trial | status | reports | step | loss | optim.lr |\n"
        "|---|---|---|---|---|---|\n"
        "| a | stopped early | 1 | 1 | 0.5 | 0.001 |\n"
        "| b | complete | 4 | 4 | 2 | 0.002 |\n")
    assert csv_table(rows).splitlines() == ["trial,status,reports,step,loss,optim.lr",
                                            "a,stopped early,1,1,0.5,0.001", "b,complete,4,4,2.0,0.002"]
