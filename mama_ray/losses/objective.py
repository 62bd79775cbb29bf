"""The MaMA objective (method.md §3 schedule): weighted terms, switched on at the late-loss step.

  step < late_loss_step:  loss = w_clip·L_clip(V¹,U)
  step ≥ late_loss_step:  loss = w_clip·L_clip(V¹,U) + w_clip2·L_clip(V²,U) + w_mv·L_ntxent + w_sla·L_sla

Every term is returned by name so all of them are logged. A term that does not count (before the
late step, or weight 0) is not computed and is reported as 0 — so before the late step the
second view need not even be encoded (``out2=None``), as in the original.
"""

from __future__ import annotations

import torch

from mama_ray.config import LossConfig
from mama_ray.losses.contrastive import Gather, clip_loss, ntxent_loss
from mama_ray.losses.local import sla_loss

TERMS = ("clip_loss", "clip2_loss", "mv_loss", "sla_loss")


class MamaObjective:
    """Combines the four terms with ``cfg.loss`` weights and the late-loss schedule."""

    def __init__(self, loss_cfg: LossConfig):
        self.cfg = loss_cfg

    def is_late(self, step: int) -> bool:
        """Whether optimizer step ``step`` uses the multi-view and local terms (late_loss_step < 0: always)."""
        return step >= self.cfg.late_loss_step

    def __call__(self, out1: dict, out2: dict | None, step: int,
                 gather: bool | Gather | None = None) -> dict[str, torch.Tensor]:
        """Named loss terms for one micro-batch.

        Args:
            out1: ``MamaModel.forward`` outputs for the primary images and their captions.
            out2: ``MamaModel.encode_image(image2, local=False)`` outputs; needed only when late.
            step: the optimizer step (not the micro-batch).
            gather: the NT-Xent gather (see ``ntxent_loss``); None = ``cfg.gather_ntxent``.
        Returns:
            ``clip_loss``, ``clip2_loss``, ``mv_loss``, ``sla_loss`` (unweighted) and ``loss`` (weighted sum).
        """
        c = self.cfg
        zero = out1["image_emb"].new_zeros((), dtype=torch.float32)
        terms = dict.fromkeys(TERMS, zero)
        terms["clip_loss"] = clip_loss(out1["image_emb"], out1["text_emb"], out1["logit_scale"])
        late = self.is_late(step)
        if late and out2 is None and (c.clip2_weight or c.mv_weight):
            raise ValueError(f"step {step} ≥ loss.late_loss_step={c.late_loss_step}: the objective "
                             "needs out2 (the second view's encode_image outputs)")
        if late and c.clip2_weight:
            terms["clip2_loss"] = clip_loss(out2["image_emb"], out1["text_emb"], out1["logit_scale"])
        if late and c.mv_weight:
            terms["mv_loss"] = ntxent_loss(out1["mv_emb"], out2["mv_emb"], c.ntxent_temperature,
                                           c.gather_ntxent if gather is None else gather)
        if late and c.sla_weight:
            terms["sla_loss"] = sla_loss(out1["patch_emb"], out1["sent_emb"], out1["sent_mask"],
                                         out1["local_scale"])
        weights = {"clip_loss": c.clip_weight, "clip2_loss": c.clip2_weight,
                   "mv_loss": c.mv_weight, "sla_loss": c.sla_weight}
        terms["loss"] = sum(weights[k] * terms[k] for k in TERMS if k == "clip_loss" or late)
        return terms
