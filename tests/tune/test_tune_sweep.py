"""A real sweep on the session cluster: ASHA stops the clearly worse trial, the best config trains.

Two grid trials of 4 one-step reports each (1 worker, real DeepSpeed, real Ray Data pipeline), one
at a time. The second weights the CLIP loss ×1000, so its loss is ~1000× the first's at every
step; with grace period 1 and halving rate 2, ASHA's first rung (1 report) has only the first
trial's value, which the second is below the 50th percentile of: it must stop after 1 report.
"""

import csv
import math

import pytest
from ray import tune

from mama_ray import config, storage
from mama_ray.sweep import run_sweep
from mama_ray.train.launch import build_trainer, run_uri

pytestmark = pytest.mark.integration


def test_asha_stops_the_worse_trial_and_best_config_trains(ray_session, sweep_cfg, tmp_path):
    cfg = config.override(sweep_cfg, {"tune.num_samples": 1})  # the grid once
    out = run_sweep(cfg, {"loss.clip_weight": tune.grid_search([1.0, 1000.0])})

    by_weight = {r["loss.clip_weight"]: r for r in out.rows}
    assert set(by_weight) == {1.0, 1000.0}
    good, bad = by_weight[1.0], by_weight[1000.0]
    assert (good["status"], good["reports"], good["step"]) == ("complete", 4, 4)
    assert (bad["status"], bad["reports"], bad["step"]) == ("stopped early", 1, 1)
    assert bad["loss"] > 10 * good["loss"] > 0
    assert out.best_trial == good["trial"] and out.rows[0] is good

    with open(storage.join(out.uri, "trials.csv")) as f:
        table = list(csv.DictReader(f))
    assert [(r["trial"], r["status"]) for r in table] == [(good["trial"], "complete"), (bad["trial"], "stopped early")]
    assert math.isclose(float(table[0]["loss"]), good["loss"])

    best = config.load(out.best_config)  # the YAML a user passes to jobs/pretrain.py --config
    assert best.loss.clip_weight == 1.0 and best.run.name == f"{sweep_cfg.run.name}-sweep-tiny-best"
    assert best.data.shards == sweep_cfg.data.shards and best.storage.run_dir == sweep_cfg.storage.run_dir
    result = build_trainer(config.override(best, {"train.max_steps": 2, "train.checkpoint_every": 2})).fit()
    assert result.error is None and result.metrics["step"] == 2 and math.isfinite(result.metrics["loss"])
    assert storage.exists(storage.join(run_uri(best), "checkpoint_00000002", "train_state.json"))
