"""Elastic resume (issue 15): a run checkpointed at W ranks continues at W' ≠ W with its model,
optimizer and data position, on the session cluster with real DeepSpeed ZeRO-2 and ZeRO-3.

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


def _over(tmp_path, name: str, stage: int = 2) -> dict:
    return {"deepspeed.zero_stage": stage, "train.max_steps": 6, "train.checkpoint_every": 3,
            "loss.mv_weight": 0.0,  # NT-Xent gathers the global batch: accumulation cannot reproduce it
            "storage.run_dir": str(tmp_path / "runs"), "run.name": name}


@pytest.fixture(scope="module")
def uninterrupted(kit, tmp_path_factory):
    """One process × grad_accum 4, never stopped: the losses every elastic run must match.

    ZeRO-2 here whatever the stage under test (fp32: the stage changes no loss): a ZeRO-3 engine in
    the test process would replace ``F.linear`` process-wide for later tests (docs/pitfalls.md).
    """
    root = tmp_path_factory.mktemp("uninterrupted")
    return kit.run_local(kit.tiny_cfg(**_over(root, "ref"), **{"train.grad_accum": 4}), root / "local").reports


@pytest.mark.parametrize("stage, before, after", [(2, 2, 4), (2, 4, 2), (3, 2, 4), (3, 4, 2)])
def test_resume_at_another_world_size_continues_model_optimizer_and_data(stage, before, after, uninterrupted,
                                                                         ray_session, tmp_path, kit):
    """ZeRO-2 re-cuts the optimizer partitions; ZeRO-3 the weight partitions as well."""
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    over = _over(tmp_path, f"elastic{stage}{before}{after}", stage)
    accum = {2: 2, 4: 1}
    first = kit.tiny_cfg(**over, **{"scaling.num_workers": before, "train.grad_accum": accum[before],
                                    "train.stop_at_step": 3})
    _fit(first, kit)
    second = kit.tiny_cfg(**over, **{"scaling.num_workers": after, "train.grad_accum": accum[after]})
    _fit(second, kit)
    logged = {int(m["step"]): m for m in read_metrics(run_uri(second))}
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    for want in uninterrupted:
        got = logged[int(want["step"])]
        for term in ("loss", "clip_loss", "sla_loss"):
            assert got[term] == pytest.approx(want[term], rel=1e-4, abs=1e-5), (got["step"], term)
