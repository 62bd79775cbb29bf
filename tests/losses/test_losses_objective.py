"""MamaObjective: the method.md §3 schedule (clip only, then all four terms) and the per-term weights."""

from __future__ import annotations

import math

import pytest
import torch

from mama_ray.config import LossConfig
from mama_ray.losses import MamaObjective, clip_loss, ntxent_loss, sla_loss


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


EYE = torch.eye(2)
OUT1 = {
    "image_emb": EYE, "text_emb": EYE, "logit_scale": torch.zeros(1),  # CLIP by hand: 2·softplus(−1)
    "mv_emb": EYE, "patch_emb": torch.tensor([[[1.0, 0], [0, 1]], [[1.0, 0], [1.0, 0]]]),
    "sent_emb": torch.tensor([[[1.0, 0], [0, 1]], [[0, 1.0], [0, 0]]]),
    "sent_mask": torch.tensor([[True, True], [True, False]]), "local_scale": torch.zeros(1),
}
OUT2 = {"image_emb": torch.tensor([[0.6, 0.8], [0.0, 1.0]]), "mv_emb": EYE}


def test_before_late_step_only_clip_counts():
    obj = MamaObjective(LossConfig(late_loss_step=10, clip_weight=0.5))
    terms = obj(OUT1, None, step=9)
    assert not obj.is_late(9) and obj.is_late(10)
    assert terms["clip_loss"].item() == pytest.approx(2 * softplus(-1), abs=1e-6)
    assert [terms[k].item() for k in ("clip2_loss", "mv_loss", "sla_loss")] == [0.0, 0.0, 0.0]
    assert terms["loss"].item() == pytest.approx(0.5 * 2 * softplus(-1), abs=1e-6)


def test_late_step_adds_weighted_terms():
    cfg = LossConfig(late_loss_step=10, clip_weight=1.0, clip2_weight=2.0, mv_weight=3.0, sla_weight=0.5)
    terms = MamaObjective(cfg)(OUT1, OUT2, step=10, gather=False)
    # values of each term by hand (see test_losses_terms.py for the derivations)
    clip2 = (softplus(0.8 - 0.6) + softplus(0 - 1)) / 2 + (softplus(0 - 0.6) + softplus(0.8 - 1)) / 2
    mv = math.log(1 + 2 * math.exp(-2))  # z1 = z2 = e1, e2 at T = 0.5
    sla = 2 * (softplus(-0.5) + softplus(1)) / 2 + 2 * (softplus(0) + softplus(0.5)) / 2
    want = {"clip_loss": 2 * softplus(-1), "clip2_loss": clip2, "mv_loss": mv, "sla_loss": sla}
    for k, v in want.items():
        assert terms[k].item() == pytest.approx(v, abs=1e-6), k
    total = want["clip_loss"] + 2 * clip2 + 3 * mv + 0.5 * sla
    assert terms["loss"].item() == pytest.approx(total, abs=1e-5)
    # and the same numbers as the term functions themselves
    assert terms["clip2_loss"].item() == pytest.approx(clip_loss(OUT2["image_emb"], EYE, torch.zeros(1)).item())
    assert terms["mv_loss"].item() == pytest.approx(ntxent_loss(EYE, EYE, 0.5, gather=False).item())
    assert terms["sla_loss"].item() == pytest.approx(
        sla_loss(OUT1["patch_emb"], OUT1["sent_emb"], OUT1["sent_mask"], torch.zeros(1)).item())


def test_zero_weight_term_is_skipped_and_negative_late_step_means_always():
    obj = MamaObjective(LossConfig(late_loss_step=-1, mv_weight=0.0, clip2_weight=0.0))
    terms = obj({k: v for k, v in OUT1.items() if k != "mv_emb"}, None, step=0)
    assert obj.is_late(0)
    assert terms["mv_loss"].item() == 0.0 and terms["sla_loss"].item() > 0
    assert terms["loss"].item() == pytest.approx((terms["clip_loss"] + terms["sla_loss"]).item())


def test_late_step_without_second_view_is_an_error():
    with pytest.raises(ValueError, match="needs out2"):
        MamaObjective(LossConfig(late_loss_step=0))(OUT1, None, step=5)
