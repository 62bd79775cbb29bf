"""A real sweep on the session cluster: ASHA stops a trial on a validation metric reported during training.

Two grid trials of 4 one-step reports each (1 worker, real DeepSpeed, real Ray Data pipeline,
validation at steps 2 and 4 on the val split), one at a time, ranked by ``val_clip_loss`` (the
default metric). The trials differ in ``train.micro_batch_size`` (2 vs 8), which is also the val
batch size: CLIP's in-batch softmax over B candidates makes the barely trained model's val CLIP
loss ≈ 2·ln B per batch (≈ 1.4 vs ≈ 3.2 here), far apart whatever the two trials learnt in 4
steps. (That is also why a sweep must not rank different batch sizes by a loss: docs/tune.md.)
ASHA's rungs are at 1, 2 and 4 results; the first result with the metric is the 2nd (step 2),
where the second trial is below the first's value: it must stop there.
"""

import csv
import math
from pathlib import Path

import pytest
from ray import tune

from mama_ray import config, storage
from mama_ray.sweep import run_sweep
from mama_ray.train.launch import build_trainer, run_uri

pytestmark = pytest.mark.integration


def test_asha_stops_on_the_val_metric_and_best_config_trains(ray_session, sweep_cfg, tmp_path):
    cfg = config.override(sweep_cfg, {"tune.num_samples": 1})  # the grid once
    assert cfg.tune.metric == "val_clip_loss" and cfg.train.val_every == 2
    out = run_sweep(cfg, {"train.micro_batch_size": tune.grid_search([2, 8])})

    by_batch = {r["train.micro_batch_size"]: r for r in out.rows}
    good, bad = by_batch[2], by_batch[8]
    assert (good["status"], good["reports"], good["step"]) == ("complete", 4, 4)
    assert (bad["status"], bad["reports"], bad["step"]) == ("stopped early", 2, 2)
    assert 0 < good["val_clip_loss"] < 2 * math.log(2) + 0.5 < 2 * math.log(5) - 0.5 < bad["val_clip_loss"]
    assert out.best_trial == good["trial"] and out.rows[0] is good

    header = Path(storage.join(out.uri, "trials.md")).read_text().splitlines()[0]
    assert all(k in header for k in ("val_clip_loss", "val_loss", "val_mv_loss", "val_i2t_r1"))
    with open(storage.join(out.uri, "trials.csv")) as f:
        table = list(csv.DictReader(f))
    assert [(r["trial"], r["status"]) for r in table] == [(good["trial"], "complete"), (bad["trial"], "stopped early")]
    assert math.isclose(float(table[0]["val_clip_loss"]), good["val_clip_loss"])
    assert Path(out.best_config).read_text().startswith(f"# best trial {good['trial']} ")

    best = config.load(out.best_config)  # the YAML a user passes to jobs/pretrain.py --config
    assert best.train.micro_batch_size == 2 and best.run.name == f"{sweep_cfg.run.name}-sweep-tiny-best"
    assert best.data.shards == sweep_cfg.data.shards and best.storage.run_dir == sweep_cfg.storage.run_dir
    result = build_trainer(config.override(best, {"train.max_steps": 2, "train.checkpoint_every": 2})).fit()
    assert result.error is None and result.metrics["step"] == 2 and math.isfinite(result.metrics["val_loss"])
    assert storage.exists(storage.join(run_uri(best), "checkpoint_00000002", "train_state.json"))
