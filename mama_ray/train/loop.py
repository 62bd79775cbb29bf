"""The worker training loop: DeepSpeed engine, late-loss objective, reports and checkpoints.

One function, :func:`train_loop`, runs on every rank. It receives everything through its
arguments — the config, a :class:`~mama_ray.train.context.TrainContext` and a batch source — so
the same code runs under Ray Train (:mod:`mama_ray.train.launch`) and in one local process.

Per optimizer step ``s`` (0-based): set the learning rates for ``s`` (late group 0 before
``loss.late_loss_step``), run ``train.grad_accum`` micro-batches (the second view is encoded only
once the late terms are on, as in the original), let DeepSpeed average gradients across ranks and
step. Every ``train.log_every`` steps the metrics are reported; every ``train.checkpoint_every``
steps and at the end a checkpoint is reported with them (both are barriers every rank reaches).
Every ``train.val_every`` steps and at the end the val split is evaluated and its metrics join
that step's report (:mod:`mama_ray.train.validate`); the best by ``train.best_metric`` is kept
under ``<run>/best`` (:mod:`mama_ray.train.best`).
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from mama_ray import layout, monitoring
from mama_ray.config import Config, stop_step
from mama_ray.data.tokenizer import load_tokenizer
from mama_ray.losses import MamaObjective
from mama_ray.models import build_model as default_build
from mama_ray.models.flops import peak_tflops
from mama_ray.train import checkpoint as ckpt_mod
from mama_ray.train.context import TrainContext
from mama_ray.train.deepspeed_config import (
    build_deepspeed_config,
    resolve_precision,
    warn_if_slow_cpu_bf16,
)
from mama_ray.train.failure import FatalTrainingError, as_fatal_first_step_error
from mama_ray.train.metrics import (
    EventWriter,
    StepMeter,
    eta_seconds,
    peak_memory_mb,
    print_progress,
    progress_line,
    utilisation,
)
from mama_ray.train.optim import build_optimizer, group_lr, set_learning_rates
from mama_ray.train.validate import Validation, is_val_step

Batch = dict[str, Any]


class BatchSource(Protocol):
    """Where a rank's batches come from (the Ray Data pipeline in a run, a generator in tests)."""

    def epoch_batches(self, epoch: int, skip_samples: int) -> Iterable[Batch]:
        """This rank's batches of ``epoch``, without the first ``skip_samples`` samples."""


class TwoViews(torch.nn.Module):
    """Wraps the model so one engine call encodes the paired sample (and the second view when late).

    DeepSpeed must see every forward through ``engine(...)`` (ZeRO-3 gathers parameters in its
    hooks), so the second view's ``encode_image`` goes through this forward too.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image1, input_ids, attention_mask, sep_mask, image2=None):
        late = image2 is not None  # before the late step neither the local features nor x² are needed
        out1 = self.model(image1, input_ids, attention_mask, sep_mask, local=late)
        out2 = self.model.encode_image(image2, local=False) if late else None
        return out1, out2


class EpochCursor:
    """Walks a rank's batches across epochs, counting the samples consumed for exact resume."""

    def __init__(self, data: BatchSource, state: layout.TrainState):
        self.data, self.state = data, state
        self._it: Iterator[Batch] | None = None

    def next(self) -> tuple[Batch, float]:
        """The next batch and the seconds spent waiting for it."""
        t0 = time.perf_counter()
        fresh = False
        while True:
            if self._it is None:
                self._it = iter(self.data.epoch_batches(self.state.epoch, self.state.samples_in_epoch,
                                                        **self.state.source_args()))  # elastic history
                fresh = self.state.samples_in_epoch == 0
            try:
                batch = next(self._it)
                break
            except StopIteration:
                if fresh:
                    raise ValueError(f"epoch {self.state.epoch} gave this worker no batches: "
                                     "the data set is smaller than one micro-batch per worker") from None
                self.state.epoch += 1
                self.state.samples_in_epoch = 0
                self._it = None
        self.state.samples_in_epoch += len(batch["image1"])
        return batch, time.perf_counter() - t0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_engine(model: torch.nn.Module, cfg: Config, ctx: TrainContext):
    """``deepspeed.initialize`` on the two-view wrapper with our AdamW and DeepSpeed config."""
    # why: deepspeed reads DS_ACCELERATOR on first import and must not load on the driver (docs/pitfalls.md)
    import deepspeed

    optimizer = build_optimizer(model, cfg)
    ds_config = build_deepspeed_config(cfg, ctx.world_size, ctx.on_gpu)
    if ctx.rank == 0:
        warn_if_slow_cpu_bf16(resolve_precision(cfg, ctx.on_gpu), ctx.on_gpu)
    engine, _, _, _ = deepspeed.initialize(model=TwoViews(model), optimizer=optimizer, config=ds_config)
    return engine


def _to(batch: Batch, key: str, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(batch[key]).to(device, non_blocking=True)


def micro_step(engine, objective, batch: Batch, step: int, device: torch.device) -> tuple[dict, dict]:
    """Forward + backward of one micro-batch; returns the loss terms and the first view's outputs."""
    late = objective.is_late(step)
    out1, out2 = engine(_to(batch, "image1", device), _to(batch, "input_ids", device),
                        _to(batch, "attention_mask", device), _to(batch, "sep_mask", device),
                        _to(batch, "image2", device) if late else None)
    terms = objective(out1, out2, step)
    engine.backward(terms["loss"])
    engine.step()  # DeepSpeed only updates at the accumulation boundary
    return terms, out1


def _scale(x: torch.Tensor) -> float:
    return float(x.detach().float().exp().mean())


class Reporter:
    """Turns the meter into reported metrics, TensorBoard events and a progress line (rank 0)."""

    def __init__(self, cfg: Config, ctx: TrainContext, run_uri: str, start_step: int, stop: int):
        self.cfg, self.ctx, self.stop, self.start_step = cfg, ctx, stop, start_step
        self.events = EventWriter(run_uri) if ctx.rank == 0 and run_uri else None
        self.started = time.perf_counter()
        # MFU needs the device's peak: known GPUs only (mama_ray/models/flops.py PEAK_BF16_TFLOPS)
        self.peak = peak_tflops(torch.cuda.get_device_name(ctx.device)) if ctx.on_gpu else None

    def metrics(self, meter: StepMeter, state: layout.TrainState, out1: dict) -> dict[str, float]:
        m = meter.summary(self.ctx.world_size)
        step_idx = state.step - 1  # the step whose update just happened
        m.update(step=state.step, epoch=state.epoch, lr=group_lr("main", self.cfg, step_idx),
                 lr_late=group_lr("late", self.cfg, step_idx), logit_scale=_scale(out1["logit_scale"]),
                 local_scale=_scale(out1["local_scale"]), memory_mb=peak_memory_mb(self.ctx.device),
                 start_step=self.start_step)
        if self.peak:
            m.update(utilisation(self.cfg, step_idx, m["samples_per_s"], self.ctx.world_size, self.peak))
        return m

    def publish(self, m: dict[str, float], state: layout.TrainState, checkpoint_dir: str | None) -> None:
        if self.events is not None:
            self.events.scalars(m, state.step)
            if checkpoint_dir:
                self.events.flush()
            print_progress(progress_line(state.step, self.cfg.train.max_steps, m, self.started, self.start_step))
        monitoring.publish_train(self.cfg.run.name, self.ctx.rank, self.ctx.world_size, m, eta_seconds(
            state.step, self.cfg.train.max_steps, self.started, self.start_step))  # Prometheus, for the dashboard
        name = layout.checkpoint_name(state.step) if checkpoint_dir else None
        self.ctx.report(m, checkpoint_dir, name)

    def close(self) -> None:
        if self.events is not None:
            self.events.close()


def _gather_data_states(state: layout.TrainState, world_size: int) -> list[dict[str, int]]:
    mine = {"epoch": state.epoch, "samples_in_epoch": state.samples_in_epoch}
    if world_size == 1:
        return [mine]
    out: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(out, mine)
    return out


class Due(NamedTuple):
    """What the loop does after an optimizer step (see :func:`report_due`)."""

    report: bool  # report metrics (every log, checkpoint and validation step)
    checkpoint: bool  # save and report a checkpoint
    validate: bool  # validate first; its metrics join the report


def report_due(cfg: Config, step: int, stop: int, validates: bool = True) -> Due:
    """The report cadence, in one place: after optimizer step ``step`` (counted from 1) of a launch
    ending at ``stop``, a report every ``train.log_every`` steps, a checkpoint every
    ``train.checkpoint_every`` steps and at ``stop``, a validation (when the run ``validates``) at
    the steps of :func:`~mama_ray.train.validate.is_val_step`; checkpoints and validations are
    reported too. ``mama_ray.sweep.report_count`` counts these reports for ASHA."""
    checkpoint = step % cfg.train.checkpoint_every == 0 or step == stop
    validate = validates and is_val_step(cfg, step, stop)
    return Due(checkpoint or validate or step % cfg.train.log_every == 0, checkpoint, validate)


def train_loop(cfg: Config, ctx: TrainContext, data: BatchSource, *, run_uri: str = "",
               build_model: Callable | None = None, tokenizer=None, val=None) -> dict[str, float]:
    """Train until ``train.max_steps`` (or ``train.stop_at_step``), resuming from the context's checkpoint.

    Args:
        cfg: the run's config.
        ctx: rank, world size, device, report and checkpoint access.
        data: this rank's batch source.
        run_uri: run folder for TensorBoard events (``""`` = none).
        build_model: ``(cfg, tokenizer) -> MamaModel``; default :func:`mama_ray.models.build_model`.
        tokenizer: default ``load_tokenizer(cfg)``.
        val: this rank's validation samples (a ``ValSource``); None = no validation.
    Returns:
        The last reported metrics (``{"step": …}`` only if the run was already complete).
    """
    attempt = Attempt()
    try:
        return _train(cfg, ctx, data, run_uri, build_model, tokenizer, attempt, val)
    except FatalTrainingError:
        raise
    except Exception as e:
        # Before the attempt's first step is done, an error is a bug or a bad setting, not a lost
        # node: restarting would repeat it (mama_ray/train/failure.py).
        fatal = None if attempt.stepped else as_fatal_first_step_error(e, attempt.first_step)
        if fatal is None:
            raise
        raise fatal from e


@dataclass
class Attempt:
    """How far this attempt (one start of the worker group) got."""

    first_step: int = 0  # the step it started from
    stepped: bool = False  # whether it finished an optimizer step


def _train(cfg, ctx, data, run_uri, build_model, tokenizer, attempt: Attempt, val=None) -> dict[str, float]:
    engine, model, tokenizer, state = _start(cfg, ctx, build_model, tokenizer)
    attempt.first_step = state.step
    stop = stop_step(cfg)
    if state.step >= stop:
        return {"step": float(state.step)}
    objective = MamaObjective(cfg.loss)
    reporter = Reporter(cfg, ctx, run_uri, state.step, stop)
    validation = Validation.start(cfg, ctx, val, tokenizer, run_uri)
    cursor, meter, last = EpochCursor(data, state), StepMeter(), {}
    engine.train()
    while state.step < stop:
        set_learning_rates(engine.optimizer.param_groups, cfg, state.step)
        for _ in range(cfg.train.grad_accum):
            batch, wait = cursor.next()
            terms, out1 = micro_step(engine, objective, batch, state.step, ctx.device)
            meter.add_micro(terms, len(batch["image1"]), wait, step=state.step)
        state.step += 1
        meter.steps += 1
        attempt.stepped = True
        last = _maybe_report(cfg, ctx, reporter, meter, state, out1, stop, engine, model, tokenizer,
                             validation) or last
    reporter.close()
    return last


def _start(cfg: Config, ctx: TrainContext, build_model: Callable | None, tokenizer):
    """Model, engine and the train state (restored from the context's checkpoint, if any)."""
    seed_everything(cfg.run.seed)  # identical initial weights on every rank
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    model = (build_model or default_build)(cfg, tokenizer).to(ctx.device)
    engine = make_engine(model, cfg, ctx)
    with ctx.checkpoint_dir() as folder:
        if folder:
            state = ckpt_mod.restore(folder, engine=engine, rank=ctx.rank, world_size=ctx.world_size)
        else:
            state = layout.TrainState(world_size=ctx.world_size)
            seed_everything(cfg.run.seed + 1 + ctx.rank)  # per-rank dropout streams
    return engine, model, tokenizer, state


def check_finite(meter: StepMeter, state: layout.TrainState, world_size: int) -> None:
    """Fail the run (on every rank alike) if a loss term was NaN/inf on any rank since the last report.

    Runs before anything is reported or checkpointed, so the latest checkpoint stays finite.
    """
    bad = meter.non_finite(world_size)
    if len(bad) > 1:
        bad.pop("loss", None)  # the weighted total is non-finite because a term is: name the term
    if bad:
        first = min(bad.values())
        terms = ", ".join(f"{k} (first at step {s})" for k, s in sorted(bad.items(), key=lambda kv: kv[1]))
        raise FatalTrainingError(
            f"non-finite loss at optimizer step {first}: {terms}; stopped at step {state.step} "
            "without a checkpoint, so the latest checkpoint is the last finite one. Lower optim.lr, "
            "check the loss settings, or resume from an earlier checkpoint")


def _maybe_report(cfg, ctx, reporter, meter, state, out1, stop, engine, model, tokenizer,
                  validation=None) -> dict | None:
    """Report metrics on log and validation steps and a checkpoint on checkpoint steps and at the end."""
    due = report_due(cfg, state.step, stop, validates=validation is not None)
    if not due.report:
        return None
    check_finite(meter, state, ctx.world_size)
    m = reporter.metrics(meter, state, out1)
    if due.validate:
        m.update(validation.run(engine, model, tokenizer, state))
    meter.reset()  # after validation: the next window times training only
    if not due.checkpoint:
        reporter.publish(m, state, None)
        return m
    state.data_states = _gather_data_states(state, ctx.world_size)
    with tempfile.TemporaryDirectory(prefix="mama-ckpt-") as tmp:
        ckpt_mod.save_checkpoint(tmp, engine=engine, model=model, tokenizer=tokenizer, cfg=cfg,
                                 state=state, rank=ctx.rank)
        reporter.publish(m, state, tmp)
    return m
