"""Ray Tune sweeps over the pretraining config: each trial is one full ``TorchTrainer`` run.

A sweep is a ``ray.tune.Tuner`` over a search space that maps dotted config fields (the names
``--set`` takes) to Tune domains (``mama_ray/search_spaces.py``). A trial applies its sample to the
sweep's config with :func:`mama_ray.config.override`, builds the run's trainer with
:func:`mama_ray.train.launch.build_trainer` plus a ``TuneReportCallback`` (the Ray Train V2 + Tune
integration; ``Tuner(trainer)`` is deprecated) and fits it. Every training report (each
``train.log_every`` steps, each validation and each checkpoint) becomes one Tune result — ASHA's
time unit. The default ``tune.metric`` is ``val_clip_loss``, reported by each validation
(``train.val_every``): trials are ranked on a number no loss weight scales, and a sweep that
varies a ``loss.*_weight`` while ranking by a weighted total (``loss``, ``val_loss``) is refused
before it starts. Results without the metric (training-only reports between validations) are
skipped by ASHA. With ``train.eval_at_end``
a trial ends with one more result that adds the zero-shot balanced accuracies
(``zero_shot_birads_balanced_accuracy``, ``zero_shot_density_balanced_accuracy``).

Layout under ``storage.run_dir`` (local or s3://)::

    <run.name>-sweep-<space>/       Tune's experiment (state, one folder per trial)
        runs/<trial id>/            each trial's Ray Train run (checkpoints, metrics.jsonl)
        trials.csv, trials.md       the table of trials, best first
        best_config.yaml            the best trial's config: jobs/pretrain.py --config accepts it
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.sample import Domain

from mama_ray import config as config_mod
from mama_ray import storage
from mama_ray.config import VAL_PREFIX, ZERO_SHOT_PREFIX, Config, ConfigError
from mama_ray.driver import with_default_data
from mama_ray.eval import run_zero_shot
from mama_ray.layout import latest_checkpoint
from mama_ray.runtime import MIN_TRAINING_CPUS
from mama_ray.train.launch import build_trainer, run_uri
from mama_ray.train.loop import report_due

WEIGHTED_METRICS = ("loss", "val_loss")  # totals the loss weights scale
UNWEIGHTED_SUGGESTION = ("val_clip_loss", "val_clip2_loss", "val_mv_loss", "val_sla_loss", "val_i2t_r1",
                         "val_t2i_r1")
TIME_ATTR = "training_iteration"  # ASHA counts Tune results (one per training report)


# ------------------------------------------------------------------------------------------
# Names, places and the config of a trial
# ------------------------------------------------------------------------------------------


def sweep_name(cfg: Config) -> str:
    return f"{cfg.run.name}-sweep-{cfg.tune.space}"


def sweep_uri(cfg: Config) -> str:
    """``<storage.run_dir>/<run.name>-sweep-<space>`` (``~`` expanded): the Tune experiment folder."""
    return run_uri(config_mod.override(cfg, {"run.name": sweep_name(cfg)}))


def trial_config(base: dict[str, Any], params: dict[str, Any], sweep: str, trial_id: str) -> Config:
    """The sweep's config with a trial's sample applied; the run lives at ``<sweep>/runs/<trial id>``.

    The run name is the trial id, so a trial restarted by ``--resume`` resumes its own run.
    """
    cfg = config_mod.override(config_mod.from_dict(base), params)
    return config_mod.override(cfg, {"storage.run_dir": storage.join(sweep, "runs"), "run.name": trial_id})


def best_config(cfg: Config, params: dict[str, Any]) -> Config:
    """What ``best_config.yaml`` holds: the sweep's config, the best sample, a fresh run name."""
    return config_mod.override(cfg, {**params, "run.name": f"{sweep_name(cfg)}-best"})


def report_count(cfg: Config) -> int:
    """Training reports of one run (ASHA's ``max_t``): the steps the loop reports at, validation on."""
    stop = config_mod.stop_step(cfg)
    return sum(1 for s in range(1, stop + 1) if report_due(cfg, s, stop).report)


def local_cpus(cfg: Config) -> int:
    """Logical CPUs for a local cluster: the concurrent trials' drivers and workers, plus data tasks.

    At least ``MIN_TRAINING_CPUS``, as for ``jobs/pretrain.py``. Oversubscribing a small laptop is
    deliberate; an attached cluster keeps its own count.
    """
    t, s = cfg.tune, cfg.scaling
    per_trial = t.driver_cpus + s.num_workers * s.cpus_per_worker
    return max(MIN_TRAINING_CPUS, os.cpu_count() or 1, math.ceil(t.max_concurrent * per_trial) + 2)


def _examples(domain: Any) -> list[Any]:
    """Values a space entry can produce: one draw of a Tune domain, every grid value, or a constant."""
    if isinstance(domain, Domain):
        return [domain.sample()]
    if isinstance(domain, dict) and "grid_search" in domain:
        return list(domain["grid_search"])
    return [domain]


def check_space(cfg: Config, space: dict[str, Any]) -> None:
    """Fail with a :class:`ConfigError` naming the field when a space key or value does not fit ``cfg``."""
    if not space:
        raise ConfigError("the search space is empty", "tune.space")
    for key, domain in space.items():
        for value in _examples(domain):
            config_mod.override(cfg, {key: value})


def weighted_fields(space: dict[str, Any]) -> list[str]:
    """The loss weights a search space varies (``loss.*_weight``)."""
    return sorted(k for k in space if k.startswith("loss.") and k.endswith("_weight"))


def check_metric_against_space(cfg: Config, space: dict[str, Any]) -> None:
    """A weighted total cannot rank trials whose weights differ: it favours the smallest weights."""
    varied = weighted_fields(space)
    if varied and cfg.tune.metric in WEIGHTED_METRICS:
        raise ConfigError(
            f"{cfg.tune.metric!r} is the weighted sum of the loss terms, and the "
            f"search space varies {', '.join(varied)}: trials would be ranked by their weights, not by what "
            f"they learnt. Rank by an unweighted validation metric, e.g. --set tune.metric=val_clip_loss "
            f"(or {', '.join(UNWEIGHTED_SUGGESTION[1:])}; R@1 with tune.mode=max)", "tune.metric")


def check_sweep(cfg: Config, space: dict[str, Any]) -> None:
    """Every check a sweep makes before anything starts (ConfigError naming the field)."""
    config_mod.check_tune_settings(cfg)
    check_space(cfg, space)
    check_metric_against_space(cfg, space)


# ------------------------------------------------------------------------------------------
# The trial
# ------------------------------------------------------------------------------------------


def run_trial(params: dict[str, Any], base: dict[str, Any], sweep: str) -> None:
    """The Tune function trainable: one pretraining run whose reports Tune sees.

    Args:
        params: the trial's sample (dotted field → value).
        base: the sweep's config as a dict.
        sweep: the sweep's folder URI.
    """
    cfg = trial_config(base, params, sweep, tune.get_context().get_trial_id())
    result = build_trainer(cfg, callbacks=[TuneReportCallback()]).fit()
    if result.error:
        raise result.error
    if cfg.train.eval_at_end:
        last = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
        tune.report({**last, **zero_shot_metrics(cfg)})


def zero_shot_metrics(cfg: Config) -> dict[str, float]:
    """Zero-shot balanced accuracies of the run's last checkpoint, as flat Tune metrics."""
    ckpt = latest_checkpoint(run_uri(cfg), storage.StorageOptions.from_config(cfg.storage))
    if ckpt is None:
        raise RuntimeError(f"run {run_uri(cfg)} has no checkpoint to evaluate")
    metrics, _ = run_zero_shot(cfg, ckpt)
    return {f"{ZERO_SHOT_PREFIX}{task}_balanced_accuracy": float(m["balanced_accuracy"])
            for task, m in metrics.items() if isinstance(m, dict) and "balanced_accuracy" in m}


# ------------------------------------------------------------------------------------------
# The Tuner
# ------------------------------------------------------------------------------------------


def _trainable(cfg: Config, sweep: str):
    """``run_trial`` with the sweep's config bound; the driver reserves ``tune.driver_cpus``.

    The trial's TorchTrainer reserves its own workers (``scaling``) in a placement group of its
    own, so the trial itself asks for a fraction of a CPU only.
    """
    fn = tune.with_parameters(run_trial, base=config_mod.to_dict(cfg), sweep=sweep)
    return tune.with_resources(fn, {"cpu": cfg.tune.driver_cpus})


def _storage(cfg: Config, sweep: str) -> tuple[Any, str]:
    """``(filesystem or None, path)`` for Tune: a pyarrow filesystem only for s3:// (custom endpoints)."""
    opts = storage.StorageOptions.from_config(cfg.storage)
    fs, path = storage.filesystem(sweep, opts)
    return (fs if storage.is_s3(sweep) else None), path


def searcher(cfg: Config, space: dict[str, Any]):
    """The search algorithm ``tune.search`` names, seeded by ``run.seed``, at most
    ``tune.max_concurrent`` trials at once.

    ``random``: Tune's ``BasicVariantGenerator`` (independent samples; grid_search expands).
    ``optuna``: Ray Tune's ``OptunaSearch`` (TPE, ``TPESampler(seed=run.seed)``: its first 10
    trials are seeded random samples, later ones model the results so far) behind a
    ``ConcurrencyLimiter``. Both run under ASHA, which stops weak trials either way.
    """
    t = cfg.tune
    if t.search == "random":
        # The concurrency limit goes on the seeded generator: Tune ignores TuneConfig's
        # max_concurrent_trials when a BasicVariantGenerator is passed in.
        return BasicVariantGenerator(max_concurrent=t.max_concurrent, random_state=cfg.run.seed)
    grids = sorted(k for k, v in space.items() if isinstance(v, dict) and "grid_search" in v)
    if grids:
        raise ConfigError(f"optuna cannot search the grid of {', '.join(grids)}; "
                          "use tune.search=random or a sampled domain", "tune.search")
    try:
        import optuna  # noqa: F401 - OptunaSearch needs it; say so before any trial starts
    except ImportError:
        raise ConfigError("optuna is not installed (pip install 'mama-ray[optuna]')", "tune.search") from None
    from ray.tune.search.optuna import OptunaSearch  # why: imports optuna, an optional dependency

    return ConcurrencyLimiter(OptunaSearch(seed=cfg.run.seed), max_concurrent=t.max_concurrent)


def new_tuner(cfg: Config, space: dict[str, Any], sweep: str):
    """A fresh ``Tuner``: ASHA on ``tune.metric``, seeded :func:`searcher`, at most ``tune.max_concurrent`` trials."""
    t = cfg.tune
    fs, path = _storage(cfg, sweep)
    # stop_last_trials=False: a trial that reached max_t still ends its own way (final checkpoint,
    # zero-shot report) instead of being stopped at its last training report.
    asha = ASHAScheduler(time_attr=TIME_ATTR, max_t=report_count(cfg), grace_period=t.grace_period,
                         reduction_factor=t.reduction_factor, stop_last_trials=False)
    tune_config = tune.TuneConfig(metric=t.metric, mode=t.mode, scheduler=asha, num_samples=t.num_samples,
                                  search_alg=searcher(cfg, space))
    parent, name = path.rstrip("/").rsplit("/", 1)
    run_config = tune.RunConfig(name=name, storage_path=parent, storage_filesystem=fs,
                                failure_config=tune.FailureConfig(max_failures=0))
    return tune.Tuner(_trainable(cfg, sweep), param_space=space, tune_config=tune_config, run_config=run_config)


def restored_tuner(cfg: Config, sweep: str):
    """The interrupted sweep at ``sweep``: finished trials are kept, unfinished and errored ones resumed."""
    fs, path = _storage(cfg, sweep)
    if not tune.Tuner.can_restore(path, storage_filesystem=fs):
        raise ConfigError(f"--resume: no sweep to resume at {sweep} (same --config, --space and --set as "
                         "the interrupted sweep?)")
    return tune.Tuner.restore(path, trainable=_trainable(cfg, sweep), resume_errored=True, storage_filesystem=fs)


@dataclass
class SweepOutcome:
    uri: str  # the sweep's folder
    rows: list[dict[str, Any]]  # one per trial, best first
    best_trial: str
    best_config: str  # URI of best_config.yaml
    table: str  # the markdown table


def run_sweep(cfg: Config, space: dict[str, Any], resume: bool = False) -> SweepOutcome:
    """Run (or resume) the sweep ``cfg`` names and write its table and best config.

    Args:
        cfg: the sweep's config; ``tune.*`` sets ASHA, samples and concurrency, ``scaling.*`` each trial.
        space: dotted config field → Tune domain (``mama_ray/search_spaces.py``).
        resume: continue the interrupted sweep of the same name instead of starting one.
    Returns:
        A :class:`SweepOutcome`. Needs Ray to be initialised.
    """
    check_sweep(cfg, space)
    if cfg.tune.metric.startswith((ZERO_SHOT_PREFIX, VAL_PREFIX)):
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # some training results lack it by design

    cfg = with_default_data(cfg)
    sweep = sweep_uri(cfg)
    if resume:
        tuner = restored_tuner(cfg, sweep)
    else:
        fs, path = _storage(cfg, sweep)

        if tune.Tuner.can_restore(path, storage_filesystem=fs):
            raise ConfigError(f"a sweep already exists at {sweep}: pass --resume to continue it, "
                             "or --set run.name=<new name> to start another")
        tuner = new_tuner(cfg, space, sweep)
    grid = tuner.fit()
    return summarise(cfg, grid, sweep)


# ------------------------------------------------------------------------------------------
# Table and best config
# ------------------------------------------------------------------------------------------


def trial_rows(cfg: Config, grid) -> list[dict[str, Any]]:
    """One row per trial of a ``ResultGrid``: id, status, reports, step, the metric, the trial's last
    validation metrics, the sample; best first.

    A trial is complete when its run reached its last step (a trial resumed mid-run by ``--resume``
    reports fewer times than ``max_t`` yet completes), else it was stopped early.
    """
    last_step, metric = config_mod.stop_step(cfg), cfg.tune.metric
    rows = []
    for result in grid:
        m = result.metrics or {}
        step = int(m.get("step", 0))
        status = "error" if result.error else ("complete" if step >= last_step else "stopped early")
        rows.append({"trial": m.get("trial_id") or os.path.basename(result.path), "status": status,
                     "reports": int(m.get(TIME_ATTR, 0)), "step": step, metric: m.get(metric, math.nan),
                     **{k: m[k] for k in config_mod.val_metrics(cfg) if k in m and k != metric},
                     **dict(sorted((result.config or {}).items()))})
    return rank_rows(rows, metric, cfg.tune.mode)


STATUS_ORDER = {"complete": 0, "stopped early": 1, "error": 2}


def rank_rows(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Best first: complete trials by ``metric``, then early-stopped ones, then those without a value.

    Complete trials come first because an early-stopped trial's last value is from an earlier step
    (a shorter run, possibly before the late loss terms joined), so it does not compare like for like.
    """
    sign = 1.0 if mode == "min" else -1.0

    def key(r: dict[str, Any]) -> tuple[int, float]:
        v = r.get(metric)
        if r["status"] == "error" or not isinstance(v, int | float) or math.isnan(v):
            return (len(STATUS_ORDER), 0.0)
        return (STATUS_ORDER[r["status"]], sign * v)

    return sorted(rows, key=key)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def csv_table(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def summarise(cfg: Config, grid, sweep: str) -> SweepOutcome:
    """Write ``trials.csv``, ``trials.md`` and ``best_config.yaml`` beside the sweep's results."""
    rows = trial_rows(cfg, grid)
    best = rows[0] if rows else None
    if best is None or best["status"] == "error" or math.isnan(float(best[cfg.tune.metric])):
        raise RuntimeError(f"no trial of the sweep at {sweep} reported '{cfg.tune.metric}'; see its trial logs")
    params = {k: best[k] for k in best if k not in ("trial", "status", "reports", "step", cfg.tune.metric)
              and k not in config_mod.val_metrics(cfg)}
    best_cfg = best_config(cfg, params)
    opts = storage.StorageOptions.from_config(cfg.storage)
    table = markdown_table(rows)
    header = (f"# best trial {best['trial']} of the sweep at {sweep}: "
              f"{cfg.tune.metric} = {best[cfg.tune.metric]:.6g} ({cfg.tune.mode})\n")
    uri = storage.join(sweep, "best_config.yaml")
    storage.write_bytes(storage.join(sweep, "trials.csv"), csv_table(rows).encode(), opts)
    storage.write_bytes(storage.join(sweep, "trials.md"), table.encode(), opts)
    storage.write_bytes(uri, (header + config_mod.dump_yaml(best_cfg)).encode(), opts)
    return SweepOutcome(uri=sweep, rows=rows, best_trial=str(best["trial"]), best_config=uri, table=table)
