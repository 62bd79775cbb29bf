"""Symmetric Local Alignment, SLA (method.md §3d): sentences ↔ patches, both ways, both directions.

For text i and image n with s(i,n,p,k) = a_{n,p}·w_{i,k} (patch p, sentence k):
  A[i,n] = (1/m_i) Σ_k max_p s     (each sentence takes its best patch, then the mean)
  C[i,n] = (1/P)   Σ_p max_k s     (each patch takes its best sentence, then the mean)
  L = CE(κA) + CE(κAᵀ) + CE(κC) + CE(κCᵀ),  κ = exp(local_scale), rows = texts.
Padded sentence slots (``sent_mask`` False) take part in neither max nor mean, so captions with
different sentence counts, and single-sentence captions, are exact; a caption with no sentence
at all has nothing to align and is an error.
"""

from __future__ import annotations

import torch

from mama_ray.losses.contrastive import diagonal_ce


def sla_scores(patch_emb: torch.Tensor, sent_emb: torch.Tensor,
               sent_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, C), each B_text×B_image, from L2-normalised ``patch_emb`` B×P×E and ``sent_emb`` B×M×E."""
    counts = sent_mask.sum(dim=1)  # B
    if bool((counts == 0).any()):
        bad = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"sla_loss: captions {bad} have no sentence (no separator token)")
    s = torch.einsum("npe,ime->inpm", patch_emb.float(), sent_emb.float())  # Bt×Bi×P×M
    valid = sent_mask[:, None, None, :]  # Bt×1×1×M
    sent_best = s.max(dim=2).values  # Bt×Bi×M: best patch per sentence
    a = sent_best.masked_fill(~valid[:, :, 0], 0.0).sum(-1) / counts[:, None]  # Bt×Bi
    patch_best = s.masked_fill(~valid, float("-inf")).max(dim=3).values  # Bt×Bi×P
    c = patch_best.mean(dim=-1)  # Bt×Bi
    return a, c


def sla_loss(patch_emb: torch.Tensor, sent_emb: torch.Tensor, sent_mask: torch.Tensor,
             local_scale: torch.Tensor) -> torch.Tensor:
    """The four-term SLA loss (in-device negatives).

    Args:
        patch_emb: B×P×E′ local image features (L2-normalised).
        sent_emb: B×M×E′ local sentence features (L2-normalised; padded slots arbitrary).
        sent_mask: B×M bool, True for real sentences.
        local_scale: log of κ, shape [1].
    """
    a, c = sla_scores(patch_emb, sent_emb, sent_mask.bool())
    kappa = local_scale.float().exp()
    return diagonal_ce(kappa * a) + diagonal_ce(kappa * a.T) + diagonal_ce(kappa * c) + diagonal_ce(kappa * c.T)
