"""MaMA losses (method.md §3): CLIP, multi-view NT-Xent, symmetric local alignment, the objective.

Inputs are embeddings (normalised where the method says so); outputs are scalar tensors.
"""

from mama_ray.losses.contrastive import all_gather_with_grad, clip_loss, diagonal_ce, ntxent_loss
from mama_ray.losses.local import sla_loss, sla_scores
from mama_ray.losses.objective import TERMS, MamaObjective

__all__ = ["TERMS", "MamaObjective", "all_gather_with_grad", "clip_loss", "diagonal_ce",
           "ntxent_loss", "sla_loss", "sla_scores"]
