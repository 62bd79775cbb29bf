"""The worker loop in one process (LocalContext, real DeepSpeed ZeRO-2 on CPU, the real tiny model).

6 optimizer steps, late terms from step 3, checkpoints at 3 and 6, metrics every step.
"""

import json

import pytest
import torch

from mama_ray.layout import load_model_from_checkpoint
from mama_ray.schedule import lr_for
from mama_ray.train.loop import seed_everything
from mama_ray.train.optim import late_parameters


@pytest.fixture(scope="module")
def straight(tmp_path_factory, kit):
    cfg = kit.tiny_cfg()
    root = tmp_path_factory.mktemp("straight")
    return cfg, root, kit.run_local(cfg, root)


def _late_names(cfg, kit):
    seed_everything(cfg.run.seed)
    model = kit.no_dropout_model(cfg, None)
    ids = {id(p) for p in late_parameters(model)}
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}, init


def test_reports_schedule_and_terms(straight, kit):
    cfg, _, ctx = straight
    assert [r["step"] for r in ctx.reports] == [1, 2, 3, 4, 5, 6]
    for r in ctx.reports:
        s = int(r["step"]) - 1  # the update that step made
        assert r["lr"] == pytest.approx(lr_for(cfg, s))
        assert r["lr_late"] == (pytest.approx(lr_for(cfg, s)) if s >= 3 else 0.0)
        late_terms = (r["mv_loss"], r["sla_loss"], r["clip2_loss"])
        assert all(t > 0 for t in late_terms) if s >= 3 else all(t == 0 for t in late_terms)
        assert r["loss"] == pytest.approx(r["clip_loss"] + sum(late_terms), rel=1e-5)
        assert r["logit_scale"] > 1 and r["samples_per_s"] > 0 and 0 <= r["data_wait_frac"] <= 1


def test_late_group_frozen_until_late_step(straight, kit):
    cfg, root, _ = straight
    late, init = _late_names(cfg, kit)
    at3, at6 = kit.weights(root / "ckpt" / "checkpoint_00000003"), kit.weights(root / "ckpt" / "checkpoint_00000006")
    assert late and all(torch.equal(at3[n], init[n]) for n in late)  # lr 0 (and so no decay) for steps 0–2
    assert all(not torch.equal(at6[n], init[n]) for n in late)
    assert not torch.equal(at3["image_proj.weight"], init["image_proj.weight"])


def test_checkpoint_contents_and_model_loading(straight, kit):
    cfg, root, _ = straight
    kept = sorted(p.name for p in (root / "ckpt").iterdir())
    assert kept == ["checkpoint_00000003", "checkpoint_00000006"]
    ckpt = root / "ckpt" / "checkpoint_00000006"
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state["step"] == 6 and state["data_states"] == [{"epoch": 0, "samples_in_epoch": 24}]
    model, tok, cfg2, ts = load_model_from_checkpoint(str(ckpt))
    assert ts.step == 6 and cfg2.train.max_steps == cfg.train.max_steps and len(tok) > 0
    saved = kit.weights(ckpt)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), saved[n]), n
    assert (root / "run" / "metrics.jsonl").is_file() and any((root / "run" / "tensorboard").iterdir())


def test_resume_past_late_step_is_exact(straight, tmp_path, kit):
    cfg, root, ref = straight
    first = kit.run_local(kit.tiny_cfg(**{"train.stop_at_step": 4}), tmp_path)
    assert first.reports[-1]["step"] == 4
    second = kit.run_local(cfg, tmp_path)  # same checkpoint folder → resumes at 4, past the late step (3)
    assert [r["step"] for r in second.reports] == [5, 6]
    assert second.reports[0]["start_step"] == 4 and second.reports[0]["lr_late"] > 0
    assert second.reports[-1]["loss"] == pytest.approx(ref.reports[-1]["loss"], rel=1e-6)
    a, b = kit.weights(root / "ckpt" / "checkpoint_00000006"), kit.weights(tmp_path / "ckpt" / "checkpoint_00000006")
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-6, atol=1e-7)


def test_finished_run_is_not_retrained(straight, tmp_path, kit):
    cfg, root, _ = straight
    import shutil

    shutil.copytree(root / "ckpt", tmp_path / "ckpt")
    again = kit.run_local(cfg, tmp_path)
    assert again.reports == []  # already at max_steps: nothing trained, nothing reported
