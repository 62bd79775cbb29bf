"""Building the Ray Train ``TorchTrainer`` of a pretraining run.

:func:`build_trainer` is the one place that turns a config into a trainer (jobs/pretrain.py and
each Ray Tune trial use it); :func:`train_func` is what every worker runs. Running it from the
driver (default data, resume-or-complete, fit, zero-shot evaluation, the summary) is
:mod:`mama_ray.driver`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import ray.data
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

from mama_ray import config as config_mod
from mama_ray import storage
from mama_ray.config import Config
from mama_ray.data.pipeline import shard_paths
from mama_ray.data.stream import TrainStream
from mama_ray.data.validation import ValSet
from mama_ray.runtime import ensure_deepspeed_accelerator, setup_logging
from mama_ray.train.context import RayTrainContext
from mama_ray.train.failure import mama_torch_trainer_class
from mama_ray.train.loop import train_loop

DataFactory = Callable[[Config, int, int], Any]  # (cfg, rank, world_size) -> BatchSource
# Train V2's controller polls the workers (health + one queued report each) at this interval; it
# reads it in the process that calls ``fit()`` and passes it on to the controller.
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
# The dashboard's Train page (runs, attempts, workers) is fed by a state actor Ray Train 2.60 only
# starts when this is "1" in the process that calls ``fit()``; off by default in Ray. We turn it on
# unless the environment already says otherwise ("0" opts out).
STATE_TRACKING_ENV = "RAY_TRAIN_ENABLE_STATE_TRACKING"


class PipelineSource:
    """The Ray Data pipeline as the loop's batch source: this rank's part of each epoch's plan.

    It owns the rank's :class:`~mama_ray.data.stream.TrainStream`, so the next epoch's execution
    started in advance lives (and is dropped) with it, not in a module global.
    """

    def __init__(self, cfg: Config, rank: int, world_size: int, local_ranks: int | None = None):
        """``local_ranks``: ranks on this node, which share its object store (default: Ray Train's count)."""
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        local = ray.train.get_context().get_local_world_size() if local_ranks is None else local_ranks
        self.stream = TrainStream(cfg, rank, world_size, local_ranks=local)

    def epoch_batches(self, epoch: int, skip_samples: int, history: tuple[tuple[int, ...], ...] = ()):
        """``history``: earlier segments of ``epoch`` at other world sizes (elastic resume, see
        ``TrainState.epoch_history``); ``skip_samples`` counts their samples per rank too."""
        segment_skip = skip_samples - sum(int(seg[1]) for seg in history)
        return self.stream.epoch(epoch, segment_skip, tuple(tuple(seg) for seg in history))


def run_uri(cfg: Config) -> str:
    """``<storage.run_dir>/<run.name>`` with ``~`` expanded (what Ray Train calls the experiment folder)."""
    base = cfg.storage.run_dir if storage.is_s3(cfg.storage.run_dir) else storage.filesystem(cfg.storage.run_dir)[1]
    return storage.join(base, cfg.run.name)


def train_func(config: dict[str, Any]) -> None:
    """The Ray Train worker function.

    Args:
        config: ``cfg`` (the config as a dict), ``run_uri``, and optionally ``resume_from`` (a
            checkpoint URI used when the run has none yet), ``data_factory`` (``(cfg, rank,
            world_size) -> BatchSource``, default the Ray Data pipeline), ``val_factory`` (the
            same for the validation samples; default the val split's ``ValSet`` when the data
            is the pipeline's, else no validation) and ``build_model``.
    """
    cfg = config_mod.from_dict(config["cfg"])
    setup_logging()  # the driver's --log-level, passed on in MAMA_LOG_LEVEL

    # Ray sets OMP_NUM_THREADS to the reserved CPUs only when the driver's environment has none;
    # either way the worker computes with the CPUs it reserved, no more (no oversubscription).
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))

    ray.data.DataContext.get_current().enable_progress_bars = False  # our progress line is the one to read
    ensure_deepspeed_accelerator(cfg.scaling.use_gpu)

    ctx = RayTrainContext(config.get("resume_from", ""), storage.StorageOptions.from_config(cfg.storage))
    data = (config.get("data_factory") or PipelineSource)(cfg, ctx.rank, ctx.world_size)
    val = _val_source(cfg, config, ctx.rank, ctx.world_size)
    try:
        train_loop(cfg, ctx, data, run_uri=config["run_uri"], build_model=config.get("build_model"), val=val)
    finally:
        getattr(val, "close", lambda: None)()  # the decoded val images on this node's disk


def _val_source(cfg: Config, config: dict[str, Any], rank: int, world_size: int):
    """This rank's validation samples: ``val_factory``, else the val split when the data is the pipeline's."""
    if cfg.train.val_every == 0:
        return None
    factory = config.get("val_factory")
    if factory is None and config.get("data_factory") is None:
        factory = ValSet
    return factory(cfg, rank, world_size) if factory is not None else None


def _scaling(cfg: Config):
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **({"GPU": 1.0} if s.use_gpu else {}), **s.resources_per_worker}
    return ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources)


def check_data(cfg: Config) -> None:
    """A ``data.shards`` location that holds no shards fails here, before Ray starts (exit 2)."""
    if not cfg.data.shards:
        return  # the default synthetic set is made on demand

    try:
        shard_paths(cfg.data.shards, storage.StorageOptions.from_config(cfg.storage))
    except (ValueError, FileNotFoundError) as e:
        raise config_mod.ConfigError(
            f"no shards at {cfg.data.shards} ({e}); point it at the output "
            "of jobs/prepare_data.py, or leave it empty for the synthetic default set", "data.shards") from None


def build_trainer(cfg: Config, *, resume_from: str = "", callbacks: list | None = None,
                  data_factory: DataFactory | None = None, build_model: Callable | None = None,
                  val_factory: DataFactory | None = None):
    """The ``TorchTrainer`` of a run: scaling, storage, failure and checkpoint settings from ``cfg``.

    Args:
        cfg: the run config; ``run.name`` + ``storage.run_dir`` locate (and resume) the run.
        resume_from: checkpoint URI to start from when the run has no checkpoint of its own.
        callbacks: Ray Train callbacks (a Tune trial passes ``TuneReportCallback()``).
        data_factory: batch source per rank (tests); default the Ray Data pipeline.
        val_factory: validation samples per rank (tests); default the val split (``ValSet``) when
            ``data_factory`` is not given, else none.
        build_model: model builder (tests); default ``mama_ray.models.build_model``.
    Returns:
        A ``ray.train.torch.TorchTrainer``; ``.fit()`` (in this process) runs it.
    """
    # A worker holds one report until the next poll, so Ray's 2 s default throttles every run that
    # reports more often than that (docs/benchmarks.md, "Training overhead").
    os.environ[POLL_ENV] = str(cfg.train.report_poll_s)
    os.environ.setdefault(STATE_TRACKING_ENV, "1")
    opts = storage.StorageOptions.from_config(cfg.storage)
    fs, path = storage.filesystem(cfg.storage.run_dir, opts)
    storage.check_bucket(cfg.storage.run_dir, opts)
    run_config = RunConfig(
        name=cfg.run.name, storage_path=path, storage_filesystem=fs if storage.is_s3(cfg.storage.run_dir) else None,
        failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        callbacks=callbacks)
    loop_config = {"cfg": config_mod.to_dict(cfg), "run_uri": run_uri(cfg), "resume_from": resume_from,
                   "data_factory": data_factory, "build_model": build_model, "val_factory": val_factory}
    trainer_class = mama_torch_trainer_class()  # a TorchTrainer that does not restart on fatal errors
    return trainer_class(train_func, train_loop_config=loop_config, scaling_config=_scaling(cfg),
                         run_config=run_config)
