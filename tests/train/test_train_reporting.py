"""What the loop reports and how it reaches Ray: window means of the loss terms, the controller's poll interval."""

import os

import pytest
import torch

from mama_ray import config
from mama_ray.config import ConfigError
from mama_ray.train.launch import POLL_ENV, build_trainer
from mama_ray.train.metrics import StepMeter


def test_meter_sums_terms_in_float64():
    """Terms stay tensors until the report and add in float64: the mean equals the Python-float mean."""
    values = [0.1, 0.2, 0.3, 1e8 + 1.0]
    f32 = [torch.tensor(v, dtype=torch.float32) for v in values]
    meter = StepMeter()
    for t in f32:
        meter.add_micro({"loss": t, "clip_loss": 2 * t}, samples=4, wait_s=0.0)
    meter.steps = 2
    want = sum(float(t) for t in f32) / 4  # Python floats: float64, in this order
    assert want != float(torch.stack(f32).sum()) / 4  # an fp32 accumulator would be off
    got = meter.summary(world_size=1)
    assert got["loss"] == want
    assert got["clip_loss"] == sum(2 * float(t) for t in f32) / 4
    assert got["data_wait_frac"] == 0.0


def test_report_poll_interval_is_passed_to_ray(tmp_path, monkeypatch):
    monkeypatch.setenv(POLL_ENV, "2.0")  # restored after the test
    cfg = config.load("tiny_cpu", {"storage.run_dir": str(tmp_path), "train.report_poll_s": 0.25})
    build_trainer(cfg)
    assert os.environ[POLL_ENV] == "0.25"  # read by TorchTrainer.fit() in this process


def test_report_poll_interval_must_be_positive():
    with pytest.raises(ConfigError, match="train.report_poll_s"):
        config.load("tiny_cpu", {"train.report_poll_s": 0})


def test_utilisation_from_the_flop_model():
    from mama_ray.models.flops import pair_flops
    from mama_ray.train.metrics import utilisation

    cfg = config.load("base")  # late from step 8000
    early = pair_flops(cfg, late=False, world_size=4).total.model
    late = pair_flops(cfg, late=True, world_size=4).total.model
    u = utilisation(cfg, 7999, samples_per_s=400.0, world_size=4, peak_tflops=989.0)
    assert u["tflop_per_pair"] == early / 1e12  # ≈ 2.38 TFLOP per pair before the late step
    assert u["mfu"] == pytest.approx(100.0 * early / 989e12)  # 100 pairs/s per GPU
    assert utilisation(cfg, 8000, 400.0, 4, 989.0)["tflop_per_pair"] == late / 1e12 > early / 1e12


CADENCE = {"train.max_steps": 10, "train.log_every": 3, "train.checkpoint_every": 4, "train.val_every": 5,
           "optim.warmup_steps": 2}


@pytest.mark.parametrize(("validates", "reports", "checkpoints", "validations"), [
    (True, [3, 4, 5, 6, 8, 9, 10], [4, 8, 10], [5, 10]),  # log 3 6 9, checkpoint 4 8 + last, val 5 + last
    (False, [3, 4, 6, 8, 9, 10], [4, 8, 10], []),
])
def test_report_cadence_by_hand(validates, reports, checkpoints, validations):
    from mama_ray.train.loop import report_due

    cfg = config.load("tiny_cpu", CADENCE)
    due = {s: report_due(cfg, s, 10, validates) for s in range(1, 11)}
    assert [s for s, d in due.items() if d.report] == reports
    assert [s for s, d in due.items() if d.checkpoint] == checkpoints
    assert [s for s, d in due.items() if d.validate] == validations


def test_loop_and_sweep_share_the_cadence(tmp_path, kit):
    """The loop reports exactly at report_due's steps, and report_count (ASHA's max_t) counts them."""
    from mama_ray.sweep import report_count
    from mama_ray.train.loop import report_due

    cfg = kit.tiny_cfg(**{"train.max_steps": 5, "train.log_every": 2, "train.checkpoint_every": 4,
                          "train.val_every": 0})
    ctx = kit.run_local(cfg, tmp_path)
    assert [int(r["step"]) for r in ctx.reports] == [2, 4, 5]  # log 2 4, checkpoint 4, last 5
    assert [s for s in range(1, 6) if report_due(cfg, s, 5, validates=False).report] == [2, 4, 5]
    assert report_count(cfg) == len(ctx.reports)
