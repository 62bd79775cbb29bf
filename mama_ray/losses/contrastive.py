"""Global contrastive losses: image–text CLIP (method.md §3a, §3c) and multi-view NT-Xent (method.md §3b).

Only the NT-Xent looks across ranks: its features are all-gathered **with gradient**. The gather
is a parameter — ``True`` (torch.distributed when a process group is up), ``False`` (this rank
only), or any callable ``x (B×…) → (every rank's x concatenated in rank order (N×…), rank)`` —
so a single-process test can feed other ranks' rows and check the multi-rank formula. Logits
are computed in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def diagonal_ce(logits: torch.Tensor) -> torch.Tensor:
    """CE(M): mean over rows i of −log softmax(M_i)[i] (targets on the diagonal)."""
    return F.cross_entropy(logits.float(), torch.arange(logits.shape[0], device=logits.device))


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CE(S) + CE(Sᵀ), S = exp(logit_scale)·I·Tᵀ (B×B, in-device negatives; both directions summed).

    Args:
        image_emb, text_emb: B×E, L2-normalised, row i of each a matching pair.
        logit_scale: log of the temperature scale τ, shape [1] (or scalar).
    """
    sims = logit_scale.float().exp() * image_emb.float() @ text_emb.float().T  # B×B
    return diagonal_ce(sims) + diagonal_ce(sims.T)


def all_gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's ``x`` concatenated in rank order (gradients flow back to each rank), and
    this rank; just ``(x, 0)`` without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    import torch.distributed.nn.functional as dist_fn  # why: autograd-aware collectives, only with a process group

    return torch.cat(dist_fn.all_gather(x), dim=0), dist.get_rank()


def _no_gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    return x, 0


def resolve_gather(gather: bool | Gather | None) -> Gather:
    if callable(gather):
        return gather
    return all_gather_with_grad if gather else _no_gather


def ntxent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5,
                gather: bool | Gather | None = True) -> torch.Tensor:
    """SimCLR NT-Xent over the global batch (lightly's ``NTXentLoss`` with gather_distributed).

    For each of the 2B local anchors (z1ᵢ and z2ᵢ) the positive is the other view of sample i;
    the negatives are every other sample's two views across all ranks: logits (2B)×(2N−1),
    CE averaged over the 2B anchors.

    Args:
        z1, z2: B×D multi-view head outputs of the two views (normalised here).
        temperature: fixed T (0.5 in the method).
        gather: see the module docstring.
    """
    b = z1.shape[0]
    z1, z2 = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)
    both, rank = resolve_gather(gather)(torch.stack([z1, z2], dim=1))  # N×2×D, one collective
    z1_all, z2_all = both[:, 0], both[:, 1]  # N×D each
    own = rank * b + torch.arange(b, device=z1.device)  # this rank's rows in the global batch
    not_self = torch.ones(b, z1_all.shape[0], dtype=torch.bool, device=z1.device)
    not_self[torch.arange(b), own] = False  # an anchor is never its own negative
    l11 = (z1 @ z1_all.T / temperature)[not_self].view(b, -1)  # B×(N−1)
    l22 = (z2 @ z2_all.T / temperature)[not_self].view(b, -1)
    l12, l21 = z1 @ z2_all.T / temperature, z2 @ z1_all.T / temperature  # B×N, positives at `own`
    logits = torch.cat([torch.cat([l12, l11], 1), torch.cat([l21, l22], 1)], 0)  # 2B×(2N−1)
    return F.cross_entropy(logits, torch.cat([own, own]))
