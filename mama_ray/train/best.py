"""The best checkpoint of a run, by a validation metric, kept beside Ray Train's latest ones.

Ray Train's ``CheckpointConfig(num_to_keep=K, checkpoint_score_attribute=…)`` keeps the top K by
score, which can drop the latest (resume needs it); without a score it keeps the latest K, which
drops the best. So Ray keeps the latest ``train.keep_checkpoints`` (resume always uses the newest)
and the best is kept here, outside Ray's bookkeeping (Ray never deletes it; its names and readers are in
:mod:`mama_ray.layout`):

    <run>/best/    model/model.safetensors, model/weights.json, tokenizer/, config.yaml,
                   train_state.json  — what evaluation and export load (no DeepSpeed state:
                   a run never resumes from it)
                   best.json         {"metric", "mode", "value", "step", "phase"}, written last

At every validation whose ``train.best_metric`` improves on ``best.json`` (the run's best so far,
read back on resume), every rank gathers the full weights (collective under ZeRO-3; all ranks see
the same rank-averaged value, so all take the same decision) and rank 0 writes the folder. A
best can come from any validation step, not only a checkpoint step.
"""

from __future__ import annotations

import json
import math
import tempfile
from typing import Any

from mama_ray import layout, storage
from mama_ray.config import Config
from mama_ray.layout import BEST_FILE, best_uri, read_best
from mama_ray.train import checkpoint as ckpt_mod

PHASED = ("val_loss",)  # metrics whose meaning changes at the late-loss step


def phase(cfg: Config, step: int) -> str:
    """``late`` once the update just made (step index ``step - 1``) used the late terms, else ``early``."""
    return "late" if step - 1 >= cfg.loss.late_loss_step else "early"


def improves(value: float, best: dict[str, Any] | None, metric: str, mode: str, at_phase: str = "late") -> bool:
    """Whether ``value`` beats the recorded best (a record of another metric or mode never counts).

    For a phased metric a late value beats any early record (see the module doc).
    """
    if value is None or math.isnan(value):
        return False
    if best is None or best.get("metric") != metric or best.get("mode") != mode:
        return True
    if metric in PHASED and best.get("phase", "late") != at_phase:
        return at_phase == "late"
    return value < best["value"] if mode == "min" else value > best["value"]


class BestKeeper:
    """Keeps ``<run>/best`` up to date during a launch (every rank holds one)."""

    def __init__(self, cfg: Config, rank: int, run: str):
        self.cfg, self.rank, self.run = cfg, rank, run
        self.opts = storage.StorageOptions.from_config(cfg.storage)
        self.record = read_best(run, self.opts)

    def update(self, metrics: dict[str, float], state: layout.TrainState, model, tokenizer) -> bool:
        """Write the best checkpoint if ``metrics`` improve it; collective (all ranks call it). Returns whether."""
        t = self.cfg.train
        value, at = metrics.get(t.best_metric), phase(self.cfg, state.step)
        if not improves(value, self.record, t.best_metric, t.best_mode, at):
            return False
        weights = ckpt_mod.consolidated_state_dict(model, self.cfg, self.cfg.deepspeed.zero_stage)
        self.record = {"metric": t.best_metric, "mode": t.best_mode, "value": float(value), "step": state.step,
                       "phase": at}
        if self.rank == 0:
            self._write(weights, tokenizer, state)
        return True

    def _write(self, weights, tokenizer, state: layout.TrainState) -> None:
        uri = best_uri(self.run)
        with tempfile.TemporaryDirectory(prefix="mama-best-") as tmp:
            ckpt_mod.write_model_files(tmp, weights, tokenizer, self.cfg, state)
            storage.upload_dir(tmp, uri, self.opts)
        # Last: until it is written the folder's best.json still names the previous best's step.
        payload = json.dumps(self.record, indent=1)
        storage.write_bytes(storage.join(uri, BEST_FILE), payload.encode(), self.opts)
