"""Loss values worked out by hand from method.md §3 with tiny B, D, P, M.

Every two-column CE row below is log(1 + exp(κ·(other − diagonal))), which is how the expected
values were derived on paper.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mama_ray.losses import clip_loss, ntxent_loss, sla_loss, sla_scores


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_clip_loss_identity_pairs():
    # S = I (τ = 1): each of the 4 rows is log(1 + e^{0 − 1}); two CE means summed.
    eye = t([[1, 0], [0, 1]])
    got = clip_loss(eye, eye, torch.zeros(1))
    assert got.item() == pytest.approx(2 * softplus(-1), abs=1e-6)


def test_clip_loss_asymmetric_with_temperature():
    # τ = 2, S = 2·I·Tᵀ = [[1.2, 0], [1.6, 2]]
    img, txt = t([[1, 0], [0, 1]]), t([[0.6, 0.8], [0, 1]])
    got = clip_loss(img, txt, torch.tensor([math.log(2.0)]))
    ce_s = (softplus(0 - 1.2) + softplus(1.6 - 2)) / 2
    ce_st = (softplus(1.6 - 1.2) + softplus(0 - 2)) / 2
    assert got.item() == pytest.approx(ce_s + ce_st, abs=1e-6)


def test_ntxent_local_batch_by_hand():
    # z1 = z2 = e1, e2; T = 0.5: each anchor has positive 1/T = 2 and two negatives at 0.
    z = t([[1, 0], [0, 1]])
    got = ntxent_loss(z, 3 * z, temperature=0.5, gather=False)  # un-normalised input is normalised
    assert got.item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), abs=1e-6)


# SLA: two images with two patches each, two captions; caption 1 has one real sentence and a
# padded slot holding garbage that would change every score if it were counted.
PATCHES = t([[[1, 0], [0, 1]], [[1, 0], [1, 0]]])  # B×P×D
SENTS = t([[[1, 0], [0, 1]], [[0, 1], [float("nan"), float("nan")]]])  # B×M×D
MASK = torch.tensor([[True, True], [True, False]])


def test_sla_scores_by_hand_with_padded_slot():
    a, c = sla_scores(PATCHES, SENTS, MASK)
    # A[i,n] = mean_k max_p; C[i,n] = mean_p max_k (worked on paper)
    assert a.tolist() == [[1.0, 0.5], [1.0, 0.0]]
    assert c.tolist() == [[1.0, 1.0], [0.5, 0.0]]


@pytest.mark.parametrize("kappa", [1.0, 2.0])
def test_sla_loss_four_terms_by_hand(kappa):
    got = sla_loss(PATCHES, SENTS, MASK, torch.tensor([math.log(kappa)]))
    ce_a = (softplus(kappa * (0.5 - 1)) + softplus(kappa * (1 - 0))) / 2
    ce_at = (softplus(0.0) + softplus(kappa * (0.5 - 0))) / 2
    # C = Aᵀ here, so CE(C) = CE(Aᵀ) and CE(Cᵀ) = CE(A)
    assert got.item() == pytest.approx(2 * ce_a + 2 * ce_at, abs=1e-6)


def test_sla_loss_all_single_sentence_captions():
    patches = t([[[1, 0], [0, 1]], [[0, 1], [0, 1]]])
    sents = t([[[1, 0]], [[0, 1]]])
    mask = torch.ones(2, 1, dtype=torch.bool)
    a, c = sla_scores(patches, sents, mask)
    assert a.tolist() == [[1.0, 0.0], [1.0, 1.0]]
    assert c.tolist() == [[0.5, 0.0], [0.5, 1.0]]
    got = sla_loss(patches, sents, mask, torch.zeros(1))
    want = ((softplus(-1) + softplus(0)) / 2 + (softplus(0) + softplus(-1)) / 2
            + (softplus(-0.5) + softplus(-0.5)) / 2 + (softplus(0) + softplus(-1)) / 2)
    assert got.item() == pytest.approx(want, abs=1e-6)


def test_sla_loss_rejects_caption_without_sentences():
    with pytest.raises(ValueError, match=r"captions \[1\] have no sentence"):
        sla_loss(PATCHES, SENTS, torch.tensor([[True, True], [False, False]]), torch.zeros(1))


def test_losses_give_gradients_to_scales():
    scale = torch.zeros(1, requires_grad=True)
    img = F.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    clip_loss(img, img.flip(0), scale).backward()
    assert scale.grad is not None and scale.grad.abs().item() > 0
