"""The run folder and checkpoint layout: file names, finding checkpoints, reading them back.

The one place that knows how a run folder looks (local path, file:// or s3://)::

    <run>/checkpoint_<step:08d>/   one per ``train.checkpoint_every`` optimizer steps (Ray Train's)
        train_state.json           step, epoch, samples consumed per rank, world size (TrainState)
        config.yaml                the run's config
        model/model.safetensors    consolidated fp32 weights (no DeepSpeed needed to load them)
        model/weights.json         {"frozen_included": bool}
        tokenizer/                 Hugging Face format
        ds/, rng/                  DeepSpeed and RNG state of every rank (mama_ray.train.checkpoint)
    <run>/best/                    the best checkpoint by ``train.best_metric`` (mama_ray.train.best):
                                   the model part above, and best.json written last
    <run>/metrics.jsonl, <run>/eval/

Writing a checkpoint (DeepSpeed, ranks, RNG) is :mod:`mama_ray.train.checkpoint`; evaluation and
export only read, through this module: :func:`resolve_checkpoint` turns a run or checkpoint URI
into a checkpoint folder and :func:`load_model_from_checkpoint` rebuilds the model from it.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mama_ray import config as config_mod
from mama_ray import storage

CHECKPOINT_PREFIX = "checkpoint_"
TRAIN_STATE = "train_state.json"
CONFIG = "config.yaml"
MODEL_WEIGHTS = "model/model.safetensors"
WEIGHTS_META = "model/weights.json"
TOKENIZER = "tokenizer"
BEST_DIR = "best"
BEST_FILE = "best.json"
METRICS_FILE = "metrics.jsonl"  # one JSON line per logged step (mama_ray.train.metrics.EventWriter)
WHICH = ("latest", "best")  # what resolve_checkpoint picks in a run folder


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # this rank's data epoch
    samples_in_epoch: int = 0  # samples this rank consumed in its current epoch (all segments, see below)
    world_size: int = 1  # ranks of the run that wrote it
    data_states: list[dict[str, int]] = field(default_factory=list)  # per rank: epoch, samples_in_epoch
    rng: str = "rng/rank_<r>.pt"  # where each rank's RNG states are
    # Elastic resume: earlier segments of epoch ``history_epoch`` run at other world sizes, as
    # [world size, samples per rank consumed in it, micro-batch, grad_accum]; ``samples_in_epoch``
    # counts their samples too.
    epoch_history: list[list[int]] = field(default_factory=list)
    history_epoch: int = -1

    def data_history(self) -> tuple[tuple[int, ...], ...]:
        """The earlier segments of the current epoch (empty unless it was resumed at another world size)."""
        return tuple(tuple(int(v) for v in seg) for seg in self.epoch_history) if self.epoch == self.history_epoch else ()

    def source_args(self) -> dict[str, Any]:
        """Extra keyword arguments of ``BatchSource.epoch_batches`` for the current epoch (none in a plain run)."""
        history = self.data_history()
        return {"history": history} if history else {}


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def read_train_state(folder: str | Path, opts: storage.StorageOptions | None = None) -> TrainState:
    """The :class:`TrainState` of a checkpoint folder (local path, file:// or s3://).

    Raises:
        ValueError: the folder has no ``train_state.json`` (not a mama-ray training checkpoint).
    """
    uri = storage.join(str(folder), TRAIN_STATE)
    if not storage.exists(uri, opts):
        raise ValueError(f"checkpoint {folder}: no {TRAIN_STATE} (not a mama-ray training checkpoint)")
    return TrainState(**json.loads(storage.read_bytes(uri, opts)))


def latest_checkpoint(run_uri: str, opts: storage.StorageOptions | None = None) -> str | None:
    """URI of the newest ``checkpoint_*`` folder with a ``train_state.json`` under a run folder."""
    files = storage.list_files(run_uri, suffix=TRAIN_STATE, opts=opts)
    ckpts = sorted(f.rsplit("/", 2)[-2] for f in files if f.rsplit("/", 2)[-2].startswith(CHECKPOINT_PREFIX))
    return storage.join(run_uri, ckpts[-1]) if ckpts else None


def best_uri(run: str) -> str:
    return storage.join(run, BEST_DIR)


def read_best(run: str, opts: storage.StorageOptions | None = None) -> dict[str, Any] | None:
    """The run's ``best.json`` (metric, mode, value, step), or None when it has no best checkpoint."""
    uri = storage.join(best_uri(run), BEST_FILE)
    if not run or not storage.exists(uri, opts):
        return None
    return json.loads(storage.read_bytes(uri, opts))


def best_checkpoint(run: str, opts: storage.StorageOptions | None = None) -> str | None:
    """URI of the run's best checkpoint folder, or None."""
    return best_uri(run) if read_best(run, opts) is not None else None


def resolve_checkpoint(uri: str, which: str = "latest") -> str:
    """A checkpoint folder as given, or a run folder's newest (``latest``) or ``best`` checkpoint.

    The best is the one ``train.best_metric`` picked during training (``<run>/best``,
    :mod:`mama_ray.train.best`); the latest is what a resume uses.

    Raises:
        StorageError: neither a checkpoint (``train_state.json``) nor a run with checkpoints, or
            ``best`` asked of a run without one (trained without validation).
    """
    if which not in WHICH:
        raise ValueError(f"which={which!r}: choose from {', '.join(WHICH)}")
    if storage.exists(storage.join(uri, TRAIN_STATE)):
        return uri
    if which == "best":
        best = best_checkpoint(uri) if storage.exists(uri) else None
        if best is None:
            raise storage.StorageError(f"{uri}: no best checkpoint (best/best.json) in this run folder; it is "
                                       "written by validation during training (train.val_every > 0)")
        return best
    latest = latest_checkpoint(uri) if storage.exists(uri) else None
    if latest is None:
        raise storage.StorageError(f"{uri}: not a checkpoint folder and no checkpoint_* folder inside")
    return latest


@contextlib.contextmanager
def checkpoint_folder(uri: str):
    """A local folder with the checkpoint at ``uri`` (downloaded to a temp folder if remote)."""
    if not storage.is_s3(uri):
        yield Path(storage.filesystem(uri)[1])
        return
    with tempfile.TemporaryDirectory() as tmp:
        storage.download_dir(uri, tmp)
        yield Path(tmp)


def load_model_from_checkpoint(uri: str):
    """Rebuild the trained model without DeepSpeed.

    Args:
        uri: a checkpoint folder (local path, file:// or s3://) written by the training loop.
    Returns:
        ``(model, tokenizer, cfg, train_state)``: the ``MamaModel`` in eval mode on CPU with the
        checkpoint's weights, its tokenizer, the run's :class:`~mama_ray.config.Config` and
        :class:`TrainState`.
    Raises:
        ValueError: the folder is not a mama-ray training checkpoint.
    """
    # why: torch/transformers load only here, so the jobs' --help and checkpoint lookup stay instant
    from safetensors.torch import load_file

    from mama_ray.data.tokenizer import load_tokenizer_folder
    from mama_ray.models import build_model

    with checkpoint_folder(uri) as folder:
        if not (folder / CONFIG).is_file() or not (folder / MODEL_WEIGHTS).is_file():
            raise ValueError(f"checkpoint {uri}: missing {CONFIG} or {MODEL_WEIGHTS}")
        cfg = config_mod.from_dict(config_mod.load_yaml_text((folder / CONFIG).read_text(), uri))
        tokenizer = load_tokenizer_folder(folder / TOKENIZER, f"{uri}/{TOKENIZER}")
        state = read_train_state(folder)
        weights = load_file(str(folder / MODEL_WEIGHTS))
        meta = json.loads((folder / WEIGHTS_META).read_text())
    model = build_model(cfg, tokenizer)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or (meta["frozen_included"] and missing):
        raise ValueError(f"checkpoint {uri}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.eval(), tokenizer, cfg, state


def read_metrics(run: str, opts: storage.StorageOptions | None = None) -> list[dict]:
    """The run's logged metrics (``metrics.jsonl``), one dict per step; a re-logged step keeps its last value."""
    uri = storage.join(run, METRICS_FILE)
    if not storage.exists(uri, opts):
        return []
    by_step: dict[int, dict] = {}
    for line in storage.read_bytes(uri, opts).decode().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def checkpoint_config(checkpoint_uri: str, name: str | None, overrides: list[str]) -> config_mod.Config:
    """``name`` (preset/YAML) or else the checkpoint's own ``config.yaml``, with overrides."""
    return config_mod.load(name or storage.join(checkpoint_uri, CONFIG), overrides)
