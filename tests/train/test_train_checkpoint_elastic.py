"""Elastic resume (issue 15): a run checkpointed at W ranks continues at W' ≠ W with its model,
optimizer and data position, on the session cluster with real DeepSpeed ZeRO-2.

The samples are the training tests' synthetic ones, laid out so that W ranks × grad_accum G see
the same micro-batches per step as one process accumulating W·G: 2 ranks × G=2 ≡ 4 ranks × G=1 ≡
one process × G=4. A run that goes 2 → 4 (or 4 → 2) ranks at step 3 must therefore report the
same losses at steps 4–6 as one process that never stopped — only if the weights, the Adam
moments (re-cut for the new ZeRO partitions) and the data position all came along.
"""

import sys

import pytest
from ray import cloudpickle

from mama_ray.layout import read_metrics
from mama_ray.train.launch import build_trainer, run_uri

pytestmark = pytest.mark.integration


def elastic_source(kit):
    """The synthetic source, continuing an epoch's global sample order after earlier segments."""

    class ElasticSource(kit.SyntheticSource):
        offset = 0  # samples the whole cluster consumed in earlier segments of the epoch

        def epoch_batches(self, epoch: int, skip_samples: int, history=()):
            self.offset = sum(w * k for w, k, *_ in history)
            return super().epoch_batches(epoch, skip_samples - sum(k for _, k, *_ in history))

        def global_index(self, epoch: int, j: int) -> int:
            return self.offset + super().global_index(epoch, j)

    return ElasticSource


def _fit(cfg, kit):
    source = elastic_source(kit)
    return build_trainer(cfg, data_factory=source, build_model=kit.no_dropout_model).fit()


@pytest.mark.parametrize("before, after", [(2, 4), (4, 2)])
def test_resume_at_another_world_size_continues_model_optimizer_and_data(before, after, ray_session, tmp_path, kit):
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    over = {"deepspeed.zero_stage": 2, "train.max_steps": 6, "train.checkpoint_every": 3,
            "loss.mv_weight": 0.0,  # NT-Xent gathers the global batch: accumulation cannot reproduce it
            "storage.run_dir": str(tmp_path / "runs"), "run.name": f"elastic{before}{after}"}
    accum = {2: 2, 4: 1}
    first = kit.tiny_cfg(**over, **{"scaling.num_workers": before, "train.grad_accum": accum[before],
                                    "train.stop_at_step": 3})
    _fit(first, kit)
    second = kit.tiny_cfg(**over, **{"scaling.num_workers": after, "train.grad_accum": accum[after]})
    _fit(second, kit)
    ref = kit.run_local(kit.tiny_cfg(**over, **{"train.grad_accum": 4}), tmp_path / "local")
    logged = {int(m["step"]): m for m in read_metrics(run_uri(second))}
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    for want in ref.reports:
        got = logged[int(want["step"])]
        for term in ("loss", "clip_loss", "sla_loss"):
            assert got[term] == pytest.approx(want[term], rel=1e-4, abs=1e-5), (got["step"], term)
