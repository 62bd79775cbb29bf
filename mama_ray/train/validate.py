"""Validation during training: every ``train.val_every`` optimizer steps and at the end.

All ranks evaluate their share of the val split (:class:`mama_ray.data.validation.ValSet`: fixed
pairs, eval transform, unmasked captions) together, without gradients, the model in eval mode
(BatchNorm uses and keeps its running statistics, dropout is off) and back in its previous mode
after. Every forward goes through the DeepSpeed engine (ZeRO-3 gathers parameters in its hooks)
with the second view, so every term can be computed at every validation. Reported (rank means
over equal per-rank sample counts, i.e. means over the evaluated val images):

* ``val_loss`` — the training objective with the run's weights and late-step schedule at the
  step just trained (CLIP alone before ``loss.late_loss_step``, as the training ``loss``);
* ``val_clip_loss``, ``val_clip2_loss``, ``val_mv_loss``, ``val_sla_loss`` — every term
  **unweighted** and computed also before the late step (the NT-Xent gathers the val batches of
  all ranks, as in training), so they compare across runs whatever their weights;
* ``val_i2t_r1/r5``, ``val_t2i_r1/r5`` — image↔text retrieval recall@K over all evaluated val
  images (the gallery is every rank's embeddings; a different image's identical caption is a miss,
  as :mod:`mama_ray.eval.retrieval`);
* with ``eval.val_zero_shot``: ``val_density_balanced_accuracy``, ``val_birads_balanced_accuracy``
  (zero-shot prompts and scores of :mod:`mama_ray.eval.zero_shot`, every labelled val image);
* ``val_images`` (evaluated images, all ranks) and ``val_seconds`` (wall time of this validation).

Per-sample means weight each batch by its size. The CLIP and SLA losses use in-batch negatives,
so the numbers depend on ``train.micro_batch_size`` and ``scaling.num_workers``: compare runs
with the same ones (a Tune sweep's trials do).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np
import torch

from mama_ray.config import Config
from mama_ray.eval_metrics import classification_metrics
from mama_ray.losses.objective import TERMS, MamaObjective
from mama_ray.models.zero_shot import score_fields
from mama_ray.train.best import BestKeeper
from mama_ray.train.context import TrainContext
from mama_ray.train.metrics import rank_mean

RECALL_KS = (1, 5)
CHUNK = 2048  # query rows per similarity block


class ValSource(Protocol):
    """A rank's validation samples (:class:`mama_ray.data.validation.ValSet` in a run)."""

    fields: list  # per sample, its CaptionFields (zero-shot prompts)

    @property
    def num_samples(self) -> int:
        """This rank's samples; the same on every rank."""

    def batches(self) -> Iterable[dict[str, Any]]:
        """Batches with image1/image2, input_ids, attention_mask, sep_mask, density, birads, index."""


def is_val_step(cfg: Config, step: int, stop: int) -> bool:
    """Whether the loop validates after optimizer step ``step`` (counted from 1) of a launch ending at ``stop``."""
    v = cfg.train.val_every
    return v > 0 and (step % v == 0 or step == stop)


def unweighted(loss_cfg) -> MamaObjective:
    """The objective with every weight 1 and the late terms always on: each term, unweighted."""
    return MamaObjective(dataclasses.replace(loss_cfg, clip_weight=1.0, clip2_weight=1.0, mv_weight=1.0,
                                             sla_weight=1.0, late_loss_step=-1))


def _gather_rows(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's ``x`` (same shape on each) stacked in rank order: (W·n)×…"""
    if world_size == 1 or not torch.distributed.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def retrieval_recalls(image_emb: torch.Tensor, text_emb: torch.Tensor, offset: int, gallery_image: torch.Tensor,
                      gallery_text: torch.Tensor) -> dict[str, float]:
    """This rank's recall@K both ways: its n queries (rows ``offset…`` of the gallery) against all N.

    Same rule as :func:`mama_ray.eval_metrics.match_ranks`: rank = items scored strictly higher
    than the partner (ties favour the match).
    """
    out: dict[str, float] = {}
    for name, queries, gallery in (("i2t", image_emb, gallery_text), ("t2i", text_emb, gallery_image)):
        ranks = []
        for start in range(0, len(queries), CHUNK):
            sim = queries[start:start + CHUNK].float() @ gallery.float().T  # chunk×N
            rows = torch.arange(len(sim), device=sim.device)
            correct = sim[rows, offset + start + rows]  # chunk
            ranks.append((sim > correct[:, None]).sum(1))
        ranks_t = torch.cat(ranks)
        out.update({f"val_{name}_r{k}": float((ranks_t < k).float().mean()) for k in RECALL_KS})
    return out


class Validation:
    """The validations of one launch on one rank (see the module doc), and the best checkpoint.

    Use :meth:`start`; the loop asks :meth:`due` after each optimizer step and calls :meth:`run`
    on every rank when it is.
    """

    def __init__(self, cfg: Config, ctx: TrainContext, source: ValSource, tokenizer, run_uri: str = ""):
        self.cfg, self.ctx, self.source, self.tokenizer = cfg, ctx, source, tokenizer
        self.objective, self.terms = MamaObjective(cfg.loss), unweighted(cfg.loss)
        self.best = BestKeeper(cfg, ctx.rank, run_uri) if run_uri else None

    @classmethod
    def start(cls, cfg: Config, ctx: TrainContext, source: ValSource | None, tokenizer,
              run_uri: str = "") -> Validation | None:
        """A validation for this launch; None when ``train.val_every`` is 0 or there is no source."""
        if source is None or cfg.train.val_every == 0:
            return None
        return cls(cfg, ctx, source, tokenizer, run_uri)

    def run(self, engine, model, tokenizer, state) -> dict[str, float]:
        """Validate after ``state.step`` steps and keep the best checkpoint; collective (all ranks)."""
        metrics = self.evaluate(engine, model, state.step)
        if self.best is not None:
            self.best.update(metrics, state, model, tokenizer)
        return metrics

    @torch.no_grad()
    def evaluate(self, engine, model, step: int) -> dict[str, float]:
        """The val metrics of the weights after ``step`` optimizer steps; collective (all ranks)."""
        started = time.perf_counter()
        was_training = engine.module.training
        engine.eval()
        try:
            sums, embs, scores = self._pass(engine, model, step - 1)  # step - 1: the update just made
        finally:
            engine.train(was_training)
        n = self.source.num_samples
        out = rank_mean({f"val_{k}": float(v) / n for k, v in sums.items()}, self.ctx.world_size)
        out.update(self._retrieval(*embs))
        if scores is not None:
            out.update(self._zero_shot(*scores))
        out["val_images"] = float(n * self.ctx.world_size)
        out["val_seconds"] = time.perf_counter() - started
        return out

    def _pass(self, engine, model, step_idx: int):
        dev = self.ctx.device
        sums = {k: torch.zeros((), dtype=torch.float64, device=dev) for k in (*TERMS, "loss")}
        images, texts, index, zs = [], [], [], []
        for batch in self.source.batches():
            args = [torch.as_tensor(batch[k]).to(dev) for k in ("image1", "input_ids", "attention_mask",
                                                                "sep_mask", "image2")]
            out1, out2 = engine(*args)  # image2 given: local features and x² are encoded
            b = len(args[0])
            terms = self.terms(out1, out2, step_idx)
            for k in TERMS:
                sums[k] += b * terms[k].detach().double()
            sums["loss"] += b * self.objective(out1, out2, step_idx)["loss"].detach().double()
            images.append(out1["image_emb"].float())
            texts.append(out1["text_emb"].float())
            index.append(torch.as_tensor(batch["index"]))
            if self.cfg.eval.val_zero_shot:
                zs.append(self._scores(model, batch, out1["image_emb"]))
        idx = torch.cat(index)
        embs = (torch.cat(images), torch.cat(texts))
        scores = None
        if zs:
            labels = {t: np.concatenate([z[t] for z in zs]) for t in ("density", "birads")}
            scores = ({t: np.concatenate([z[f"{t}_scores"] for z in zs]) for t in ("density", "birads")}, labels)
        assert len(idx) == self.source.num_samples, "a validation batch went missing"
        return sums, embs, scores

    def _retrieval(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> dict[str, float]:
        w = self.ctx.world_size
        gi, gt = _gather_rows(image_emb, w), _gather_rows(text_emb, w)
        mine = retrieval_recalls(image_emb, text_emb, self.ctx.rank * len(image_emb), gi, gt)
        return rank_mean(mine, w)

    def _scores(self, model, batch: dict, image_emb: torch.Tensor) -> dict[str, np.ndarray]:
        """Zero-shot scores of one batch; ZeRO-3 partitions are gathered for the prompt encoding."""
        import deepspeed  # why: after train_func set DS_ACCELERATOR (deepspeed reads it on first import)

        fields = [self.source.fields[int(i)] for i in batch["index"]]
        e = self.cfg.eval
        with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=self.cfg.deepspeed.zero_stage == 3):
            out = score_fields(model, self.tokenizer, fields, image_emb, self.cfg.text.max_len, e.text_feature)
        return {**out, "density": np.asarray(batch["density"]), "birads": np.asarray(batch["birads"])}

    def _zero_shot(self, scores: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, float]:
        mine = {"scores": scores, "labels": labels}
        every: list[Any] = [mine]
        if self.ctx.world_size > 1:
            every = [None] * self.ctx.world_size
            torch.distributed.all_gather_object(every, mine)
        out = {}
        for task in ("density", "birads"):
            y = np.concatenate([e["labels"][task] for e in every])
            s = np.concatenate([e["scores"][task] for e in every])
            known = y >= 0
            out[f"val_{task}_balanced_accuracy"] = (
                float(classification_metrics(y[known], s[known])["balanced_accuracy"]) if known.any() else float("nan"))
        return out
