"""Validation in a real Ray Train run of the default config, and ``jobs/evaluate.py --which best``.

tiny_cpu (2 workers, DeepSpeed ZeRO-2, the real Ray Data pipeline and the real ValSet) cut to 30
steps on 60 small synthetic studies (19 val images), validating every 10 steps, late terms from
step 15.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from mama_ray import config
from mama_ray.driver import run_pretrain

pytestmark = pytest.mark.integration
REPO = Path(__file__).parents[2]


def test_default_config_validates_and_keeps_the_best(ray_session, val_shards, tmp_path, monkeypatch):
    cfg = config.load("tiny_cpu", {"data.shards": val_shards, "storage.run_dir": str(tmp_path / "runs"),
                                   "train.max_steps": 30, "train.val_every": 10, "train.micro_batch_size": 8,
                                   "loss.late_loss_step": 15, "train.eval_at_end": False})
    summary = run_pretrain(cfg)
    logged = [json.loads(x) for x in (Path(summary.run_dir) / "metrics.jsonl").read_text().splitlines()]
    val = {int(m["step"]): m for m in logged if "val_loss" in m}
    assert sorted(val) == [10, 20, 30]
    for m in val.values():
        keys = [k for k in m if k.startswith("val_")]
        assert len(keys) >= 11 and all(math.isfinite(m[k]) for k in keys)
        assert m["val_images"] == 18  # 19 val images over 2 ranks: 9 each, each once
    assert val[10]["val_loss"] == pytest.approx(val[10]["val_clip_loss"], rel=1e-6)  # before the late step
    assert val[30]["val_loss"] > val[30]["val_clip_loss"]  # after it: + the late terms (weights 1)

    best_step = min((20, 30), key=lambda s: val[s]["val_loss"])  # the lowest of the late objective
    assert summary.best == f"{summary.run_dir}/best" and summary.checkpoint.endswith("checkpoint_00000030")
    assert summary.best_record["step"] == best_step
    assert summary.best_record["value"] == pytest.approx(val[best_step]["val_loss"])
    assert any(line.startswith(f"best: {summary.best} (val_loss") for line in summary.lines())

    out = tmp_path / "eval"  # the real entry point, in this process (it attaches to the session's Ray)
    # The job file itself, as `python jobs/evaluate.py` runs it (mama_ray.jobs maps to an installed tree).
    spec = importlib.util.spec_from_file_location("mama_evaluate_job", REPO / "jobs" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--checkpoint", summary.run_dir, "--which", "best",
                                      "--tasks", "retrieval", "--out", str(out)])
    assert job.main() == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["checkpoint"] == summary.best and metrics["retrieval"]["n"] > 0
