"""A diverging or broken run stops at once with a clear error and never checkpoints NaN weights.

Local runs (one process) check the guard itself; Ray runs check that the controller does not
restart the worker group for a fatal error (``train.max_failures`` = 3 would allow three restarts).
"""

import math
import sys

import pytest
import torch
from ray import cloudpickle

from mama_ray.driver import fit_or_explain
from mama_ray.train.failure import FatalTrainingError, as_fatal_first_step_error, is_fatal
from mama_ray.train.launch import build_trainer
from mama_ray.train.metrics import StepMeter


def test_meter_names_the_first_non_finite_step_per_term():
    meter = StepMeter()
    for step, (a, b) in enumerate([(1.0, 2.0), (1.0, math.nan), (math.inf, math.nan), (1.0, 2.0)]):
        meter.add_micro({"clip_loss": torch.tensor(a), "sla_loss": torch.tensor(b)}, 4, 0.0, step=step)
    assert meter.non_finite(world_size=1) == {"clip_loss": 2, "sla_loss": 1}
    meter.reset()
    meter.add_micro({"clip_loss": torch.tensor(1.0)}, 4, 0.0, step=7)
    assert meter.non_finite(world_size=1) == {}


def test_first_step_errors_are_fatal_unless_transient():
    fatal = as_fatal_first_step_error(ValueError("image is (64, 64) but the ViT is built for 32×32"), 0)
    assert isinstance(fatal, FatalTrainingError) and "step 0" in str(fatal) and "32×32" in str(fatal)
    assert as_fatal_first_step_error(ConnectionError("peer reset"), 0) is None
    wrapped = RuntimeError("collective failed")
    wrapped.__cause__ = torch.distributed.DistError("gloo: connection closed")
    assert as_fatal_first_step_error(wrapped, 12) is None
    chained = RuntimeError("worker failed")
    chained.__cause__ = FatalTrainingError("non-finite loss")
    assert is_fatal(chained) and not is_fatal(RuntimeError("x"))


def _finite(checkpoint_dir, kit) -> bool:
    return all(torch.isfinite(w).all() for w in kit.weights(checkpoint_dir).values() if w.is_floating_point())


def test_diverging_run_stops_before_checkpointing_nan(tmp_path, kit):
    # lr 1e8 (warm-up 1e-8 → 1e8 over 2 steps): the step-2 update makes the weights blow up.
    cfg = kit.tiny_cfg(**{"optim.lr": 1e8, "train.max_steps": 12, "train.checkpoint_every": 1,
                          "train.log_every": 1})
    with pytest.raises(FatalTrainingError, match=r"non-finite (loss at optimizer step|weights)") as err:
        kit.run_local(cfg, tmp_path)
    kept = sorted((tmp_path / "ckpt").glob("checkpoint_*"))
    assert kept and all(_finite(c, kit) for c in kept)  # the latest checkpoint is the last finite one
    steps = [int(c.name.rsplit("_", 1)[1]) for c in kept]
    assert max(steps) < 12 and f"step {max(steps) + 1}" in str(err.value)


def test_nan_loss_names_step_and_term(tmp_path, kit):
    # A hand-made divergence in one term: the local scale turns NaN from micro-batch 5 (step 4) on.
    def build(cfg, tok):
        model = kit.no_dropout_model(cfg, tok)
        original = model.forward

        def forward(*a, **k):
            out = original(*a, **k)
            forward.calls += 1
            if forward.calls > 4:  # micro-batch 5 = step 4 (grad_accum 1)
                out["local_scale"] = out["local_scale"] * float("nan")
            return out

        forward.calls = 0
        model.forward = forward
        return model

    cfg = kit.tiny_cfg(**{"train.max_steps": 8, "train.checkpoint_every": 4, "train.log_every": 2})
    with pytest.raises(FatalTrainingError, match=r"non-finite loss at optimizer step 4: sla_loss \(first at step 4\)"):
        kit.run_local(cfg, tmp_path, build_model=build)
    assert [c.name for c in sorted((tmp_path / "ckpt").glob("checkpoint_*"))] == ["checkpoint_00000004"]


@pytest.mark.integration
def test_ray_does_not_restart_a_run_that_fails_in_its_first_step(ray_session, tmp_path, kit):
    """A bug in the first step fails the run after one attempt, not after 1 + max_failures."""
    attempts = tmp_path / "attempts"
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    def broken_model(cfg, tok):
        with open(attempts, "a") as f:
            f.write("x")
        model = kit.no_dropout_model(cfg, tok)
        model.vision.vit.config.image_size = 48  # the batches are 32 px: VisionTower raises ValueError
        return model

    cfg = kit.tiny_cfg(**{"storage.run_dir": str(tmp_path / "runs"), "run.name": "broken",
                          "train.max_failures": 3, "scaling.num_workers": 2})
    data = lambda c, rank, world: kit.SyntheticSource(c, rank, world)  # noqa: E731
    with pytest.raises(FatalTrainingError, match=r"step 0 \(the first of this attempt\).*48×48"):
        fit_or_explain(build_trainer(cfg, data_factory=data, build_model=broken_model))
    assert attempts.read_text() == "xx"  # two workers, one attempt
