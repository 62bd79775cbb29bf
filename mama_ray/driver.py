"""The driver side of a pretraining run (``jobs/pretrain.py``): default data, resume-or-complete,
fit, zero-shot evaluation at the end and the printed summary.

It runs in the process that calls ``fit()`` and needs Ray to be initialised; what the trainer is
and what its workers run is :mod:`mama_ray.train.launch`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mama_ray import config as config_mod
from mama_ray import storage
from mama_ray.config import Config
from mama_ray.eval.runner import run_zero_shot
from mama_ray.layout import best_uri, latest_checkpoint, read_best, read_metrics, read_train_state
from mama_ray.train.failure import fatal_error_of
from mama_ray.train.launch import build_trainer, run_uri


@dataclass
class Summary:
    run_dir: str
    checkpoint: str
    step: int
    already_complete: bool = False
    first: dict = field(default_factory=dict)  # first logged metrics
    last: dict = field(default_factory=dict)  # last logged metrics
    seconds: float = 0.0
    eval_metrics: dict = field(default_factory=dict)
    eval_table: str = ""
    best: str = ""  # the best checkpoint's folder ("" = none: no validation)
    best_record: dict = field(default_factory=dict)  # its best.json: metric, mode, value, step

    def lines(self) -> list[str]:
        state = "already complete (nothing trained)" if self.already_complete else f"trained in {self.seconds:.0f} s"
        out = [f"run: {state}, step {self.step}"]
        if self.first and self.last:  # the total jumps when the late terms join; CLIP alone is comparable
            out += [f"loss: first logged {self.first['loss']:.4f} (step {self.first['step']:.0f}) → "
                    f"last {self.last['loss']:.4f} (step {self.last['step']:.0f})",
                    f"clip loss: first logged {self.first['clip_loss']:.4f} → last {self.last['clip_loss']:.4f}"]
        if "val_loss" in self.last:
            out.append(f"validation (step {self.last['step']:.0f}): val_loss {self.last['val_loss']:.4f}, "
                       f"val_clip_loss {self.last['val_clip_loss']:.4f}, image→text R@1 {self.last['val_i2t_r1']:.3f}")
        for task, m in self.eval_metrics.items():
            if isinstance(m, dict) and "balanced_accuracy" in m:
                out.append(f"zero-shot {task}: balanced accuracy {m['balanced_accuracy']:.3f}")
        if self.best:
            b = self.best_record
            out.append(f"best: {self.best} ({b['metric']} {b['value']:.4f} at step {b['step']}, {b['mode']})")
        # Last line: the latest checkpoint (what a resume uses; scripts read it from here).
        return [*out, f"run_dir: {self.run_dir}", f"checkpoint: {self.checkpoint}"]


def with_default_data(cfg: Config) -> Config:
    """``data.shards`` empty → the default synthetic set (generated and ingested once)."""
    if cfg.data.shards:
        return cfg
    # why: the synthetic set's ingest code loads only when no data.shards is given
    from mama_ray.data.synthetic import ensure_default_shards

    return config_mod.override(cfg, {"data.shards": ensure_default_shards(cfg)})


def run_pretrain(cfg: Config, resume_from: str = "") -> Summary:
    """Train (or find complete) the run ``cfg`` names, evaluate zero-shot if asked, and summarise.

    A run whose latest checkpoint already reached ``train.max_steps`` is not trained again: the
    summary says so and points at that checkpoint (raise ``train.max_steps`` to continue it).
    Needs Ray to be initialised.
    """
    cfg = with_default_data(cfg)
    opts = storage.StorageOptions.from_config(cfg.storage)
    run = run_uri(cfg)
    latest = latest_checkpoint(run, opts)
    started = time.perf_counter()
    done = latest is not None and read_train_state(latest, opts).step >= cfg.train.max_steps
    if not done:
        result = fit_or_explain(build_trainer(cfg, resume_from=resume_from))
        if result.error:
            raise result.error
        latest = latest_checkpoint(run, opts)
    if latest is None:
        raise RuntimeError(f"run {run} finished without a checkpoint")
    logged = read_metrics(run, opts)
    record = read_best(run, opts)
    summary = Summary(run_dir=run, checkpoint=latest, step=read_train_state(latest, opts).step, already_complete=done,
                      seconds=time.perf_counter() - started, first=logged[0] if logged else {},
                      last=logged[-1] if logged else {}, best=best_uri(run) if record else "",
                      best_record=record or {})
    if cfg.train.eval_at_end:
        summary.eval_metrics, summary.eval_table = run_zero_shot(cfg, latest, storage.join(run, "eval"))
    return summary


def fit_or_explain(trainer):
    """``trainer.fit()``; a worker's :class:`FatalTrainingError` comes back as that one error."""
    try:
        return trainer.fit()
    except Exception as e:
        fatal = fatal_error_of(e)
        if fatal is None:
            raise
        raise fatal from None
