"""Checkpoints: what a training checkpoint holds, how ranks write it and how it is read back.

A checkpoint folder (one per ``train.checkpoint_every`` optimizer steps, named
``checkpoint_<step:08d>``; Ray Train merges the folders every rank reports) holds:

* ``ds/state/`` — DeepSpeed's per-rank state (module, ZeRO optimizer partitions): exact resume;
* ``rng/rank_<r>.pt`` — each rank's Python/NumPy/torch RNG states;
* ``model/model.safetensors`` — consolidated fp32 weights that load without DeepSpeed (ZeRO-3
  partitions are gathered first). All parameters, except that frozen ones are left out when
  ``model.text.weights`` names the URI they come from (the frozen text trunk of a large model is
  rebuilt from there), which ``model/weights.json`` records;
* ``tokenizer/`` (Hugging Face format), ``config.yaml`` (the run's config) and
  ``train_state.json`` (step, epoch and samples consumed per rank, world size).

:func:`load_model_from_checkpoint` is what evaluation and export use.
"""

from __future__ import annotations

import contextlib
import json
import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mama_ray import config as config_mod
from mama_ray import storage

DS_TAG = "state"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # this rank's data epoch
    samples_in_epoch: int = 0  # samples this rank consumed in its current epoch
    world_size: int = 1  # ranks of the run that wrote it
    data_states: list[dict[str, int]] = field(default_factory=list)  # per rank: epoch, samples_in_epoch
    rng: str = "rng/rank_<r>.pt"  # where each rank's RNG states are


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def rng_state() -> dict[str, Any]:
    out = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _keep_frozen(cfg: config_mod.Config) -> bool:
    """Frozen weights are saved unless the text tower's weights URI says where to rebuild them from."""
    return not cfg.model.text.weights


def consolidated_state_dict(model: torch.nn.Module, cfg: config_mod.Config, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights on every rank (collective under ZeRO-3: all ranks must call it)."""
    import deepspeed

    keep_frozen = _keep_frozen(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    wanted = [p for p in model.parameters() if keep_frozen or p.requires_grad]
    with deepspeed.zero.GatheredParameters(wanted, modifier_rank=None, enabled=zero_stage == 3):
        out = {names[id(p)]: p.detach().float().cpu().clone() for p in wanted}
        if keep_frozen:
            out.update({n: b.detach().cpu().clone() for n, b in model.named_buffers()})
    return out


def save_checkpoint(folder: str | Path, *, engine, model, tokenizer, cfg, state: TrainState, rank: int) -> None:
    """Write this rank's part of a checkpoint into ``folder`` (collective: every rank calls it)."""
    folder = Path(folder)
    engine.save_checkpoint(str(folder / "ds"), tag=DS_TAG)
    weights = consolidated_state_dict(model, cfg, cfg.deepspeed.zero_stage)
    (folder / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), folder / "rng" / f"rank_{rank}.pt")
    if rank != 0:
        return
    from safetensors.torch import save_file

    from mama_ray.models.tokenizer import save_tokenizer

    (folder / "model").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model" / "model.safetensors"))
    (folder / "model" / "weights.json").write_text(json.dumps({"frozen_included": _keep_frozen(cfg)}))
    save_tokenizer(tokenizer, str(folder / "tokenizer"))
    (folder / "config.yaml").write_text(config_mod.dump_yaml(cfg))
    (folder / "train_state.json").write_text(json.dumps(asdict(state), indent=1))


def read_train_state(folder: str | Path) -> TrainState:
    path = Path(folder) / "train_state.json"
    if not path.is_file():
        raise ValueError(f"checkpoint {folder}: no train_state.json (not a mama-ray training checkpoint)")
    return TrainState(**json.loads(path.read_text()))


def restore(folder: str | Path, *, engine, rank: int, world_size: int) -> TrainState:
    """Load DeepSpeed state, this rank's RNG and data position from a local checkpoint folder."""
    folder = Path(folder)
    state = read_train_state(folder)
    load_path, _ = engine.load_checkpoint(str(folder / "ds"), tag=DS_TAG, load_lr_scheduler_states=False)
    if load_path is None:
        raise ValueError(f"checkpoint {folder}: DeepSpeed state under ds/{DS_TAG} could not be loaded")
    if state.world_size == world_size and len(state.data_states) == world_size:
        state.epoch = state.data_states[rank]["epoch"]
        state.samples_in_epoch = state.data_states[rank]["samples_in_epoch"]
        rng = folder / "rng" / f"rank_{rank}.pt"
        if rng.is_file():
            set_rng_state(torch.load(rng, weights_only=False))
    else:
        # Another world size: the data split differs, so the exact remainder is unknown; restart the epoch.
        import warnings

        warnings.warn(f"resuming {world_size} ranks from a {state.world_size}-rank checkpoint: "
                      f"the data restarts at the beginning of epoch {state.epoch}", stacklevel=2)
        state.samples_in_epoch = 0
    state.world_size = world_size
    return state


@contextlib.contextmanager
def _local(uri: str):
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
    from safetensors.torch import load_file

    from mama_ray.models import build_model
    from mama_ray.models.tokenizer import load_tokenizer_folder

    with _local(uri) as folder:
        if not (folder / "config.yaml").is_file() or not (folder / "model" / "model.safetensors").is_file():
            raise ValueError(f"checkpoint {uri}: missing config.yaml or model/model.safetensors")
        cfg = config_mod.from_dict(config_mod.load_yaml_text((folder / "config.yaml").read_text(), uri))
        tokenizer = load_tokenizer_folder(folder / "tokenizer", f"{uri}/tokenizer")
        state = read_train_state(folder)
        weights = load_file(str(folder / "model" / "model.safetensors"))
        meta = json.loads((folder / "model" / "weights.json").read_text())
    model = build_model(cfg, tokenizer)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or (meta["frozen_included"] and missing):
        raise ValueError(f"checkpoint {uri}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.eval(), tokenizer, cfg, state


def latest_checkpoint(run_uri: str, opts: storage.StorageOptions | None = None) -> str | None:
    """URI of the newest ``checkpoint_*`` folder with a ``train_state.json`` under a run folder."""
    files = storage.list_files(run_uri, suffix="train_state.json", opts=opts)
    ckpts = sorted(f.rsplit("/", 2)[-2] for f in files if f.rsplit("/", 2)[-2].startswith("checkpoint_"))
    return storage.join(run_uri, ckpts[-1]) if ckpts else None
