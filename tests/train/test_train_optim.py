"""AdamW groups: frozen parameters excluded, late group held at lr 0 until loss.late_loss_step."""

import pytest

from mama_ray import config
from mama_ray.models import build_model
from mama_ray.schedule import lr_for
from mama_ray.train.optim import build_optimizer, late_parameters, param_groups, set_learning_rates


@pytest.fixture(scope="module")
def model():
    return build_model(config.load("tiny_cpu"))


def _ids(ps):
    return {id(p) for p in ps}


def test_frozen_excluded_and_groups_partition_trainable(model):
    cfg = config.load("tiny_cpu")
    groups = param_groups(model, cfg)
    assert [g["name"] for g in groups] == ["main", "late"]
    in_groups = [p for g in groups for p in g["params"]]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen, "LoRA should leave the text trunk frozen in the tiny preset"
    assert not _ids(frozen) & _ids(in_groups)
    assert _ids(in_groups) == _ids(p for p in model.parameters() if p.requires_grad)
    assert len(in_groups) == len(_ids(in_groups))  # no parameter twice
    late = _ids(groups[1]["params"])
    assert late == _ids(late_parameters(model))
    assert id(model.local_scale) in late and id(model.logit_scale) not in late
    assert _ids(model.mv_head.parameters()) <= late and _ids(model.local_image_head.parameters()) <= late
    assert all(g["weight_decay"] == 0.1 for g in groups)  # decay_all: the paper decays everything


def test_decay_all_false_splits_no_decay(model):
    cfg = config.load("tiny_cpu", {"optim.decay_all": False})
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert set(groups) == {"main", "main_no_decay", "late", "late_no_decay"}
    assert all(p.ndim >= 2 for p in groups["main"]["params"]) and groups["main"]["weight_decay"] == 0.1
    assert all(p.ndim < 2 for p in groups["main_no_decay"]["params"]) and groups["main_no_decay"]["weight_decay"] == 0.0
    assert id(model.local_scale) in _ids(groups["late_no_decay"]["params"])


@pytest.mark.parametrize(("step", "late_on"), [(0, False), (19, False), (20, True), (45, True)])
def test_late_group_lr(model, step, late_on):
    cfg = config.load("tiny_cpu", {"loss.late_loss_step": 20})
    opt = build_optimizer(model, cfg)
    main_lr = set_learning_rates(opt.param_groups, cfg, step)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert main_lr == lrs["main"] == pytest.approx(lr_for(cfg, step))
    assert lrs["main"] > 0
    assert lrs["late"] == (pytest.approx(lr_for(cfg, step)) if late_on else 0.0)
