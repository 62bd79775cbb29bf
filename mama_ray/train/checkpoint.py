"""Checkpoints: what a training checkpoint holds, how ranks write it and how it is read back.

A checkpoint folder (one per ``train.checkpoint_every`` optimizer steps, named
``checkpoint_<step:08d>``; Ray Train merges the folders every rank reports) holds:

* ``ds/state/`` — DeepSpeed's per-rank state (module, ZeRO optimizer partitions): exact resume;
* ``rng/rank_<r>.pt`` — each rank's Python/NumPy/torch RNG states;
* ``model/model.safetensors`` — consolidated fp32 weights that load without DeepSpeed (ZeRO-3
  partitions are gathered first; under bf16, trained weights are DeepSpeed's fp32 master copies). All parameters, except that frozen ones are left out when
  ``model.text.weights`` names the URI they come from (the frozen text trunk of a large model is
  rebuilt from there), which ``model/weights.json`` records;
* ``tokenizer/`` (Hugging Face format), ``config.yaml`` (the run's config) and
  ``train_state.json`` (step, epoch and samples consumed per rank, world size).

The file names, :class:`TrainState` and reading a checkpoint back without DeepSpeed
(:func:`~mama_ray.layout.load_model_from_checkpoint`) live in :mod:`mama_ray.layout`.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from mama_ray import config as config_mod
from mama_ray import layout
from mama_ray.data.tokenizer import save_tokenizer
from mama_ray.errors import FatalTrainingError
from mama_ray.layout import TrainState, read_train_state

DS_TAG = "state"


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


def _full_precision(p: torch.nn.Parameter) -> torch.Tensor:
    """A parameter's fp32 value: DeepSpeed's fp32 master copy for a trained bf16 weight, else itself.

    Under bf16 the module holds the master weights rounded to bf16: a small update (lr 4e-5 on a
    LayerNorm weight of 1.0) moves the master but not the rounded copy, so evaluation and export
    read the master. A collective (all ranks call it for the same parameters) when it applies.
    """
    if p.requires_grad and p.dtype != torch.float32:
        # why: deepspeed reads DS_ACCELERATOR on first import and must not load on the driver (docs/pitfalls.md)
        from deepspeed.utils import safe_get_full_fp32_param

        master = safe_get_full_fp32_param(p)
        if master is not None:
            return master
    return p.detach()


def consolidated_state_dict(model: torch.nn.Module, cfg: config_mod.Config, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights on every rank (collective under ZeRO-3 and bf16: all ranks must call it)."""
    # why: deepspeed reads DS_ACCELERATOR on first import and must not load on the driver (docs/pitfalls.md)
    import deepspeed

    keep_frozen = _keep_frozen(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    wanted = [p for p in model.parameters() if keep_frozen or p.requires_grad]
    with deepspeed.zero.GatheredParameters(wanted, modifier_rank=None, enabled=zero_stage == 3):
        out = {names[id(p)]: _full_precision(p).float().cpu().clone() for p in wanted}
        if keep_frozen:
            out.update({n: b.detach().cpu().clone() for n, b in model.named_buffers()})
    return out


def check_finite_weights(weights: dict[str, torch.Tensor], step: int) -> None:
    """Refuse to checkpoint NaN/inf weights (every rank holds the same consolidated weights)."""
    bad = [name for name, w in weights.items() if w.is_floating_point() and not bool(torch.isfinite(w).all())]
    if bad:
        raise FatalTrainingError(f"step {step}: non-finite weights in {bad[:5]} ({len(bad)} tensors); "
                                 "no checkpoint written, so the latest checkpoint is the last finite one")


def save_checkpoint(folder: str | Path, *, engine, model, tokenizer, cfg, state: TrainState, rank: int) -> None:
    """Write this rank's part of a checkpoint into ``folder`` (collective: every rank calls it)."""
    folder = Path(folder)
    weights = consolidated_state_dict(model, cfg, cfg.deepspeed.zero_stage)
    check_finite_weights(weights, state.step)
    engine.save_checkpoint(str(folder / "ds"), tag=DS_TAG)
    (folder / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), folder / "rng" / f"rank_{rank}.pt")
    if rank == 0:
        write_model_files(folder, weights, tokenizer, cfg, state)


def write_model_files(folder: str | Path, weights: dict[str, torch.Tensor], tokenizer, cfg, state: TrainState) -> None:
    """Rank 0's part of a checkpoint: what evaluation and export load (no DeepSpeed state).

    The best checkpoint (:mod:`mama_ray.train.best`) is exactly this part.
    """
    folder = Path(folder)
    (folder / "model").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model" / "model.safetensors"))
    (folder / "model" / "weights.json").write_text(json.dumps({"frozen_included": _keep_frozen(cfg)}))
    save_tokenizer(tokenizer, str(folder / "tokenizer"))
    (folder / "config.yaml").write_text(config_mod.dump_yaml(cfg))
    (folder / layout.TRAIN_STATE).write_text(json.dumps(asdict(state), indent=1))


def restore(folder: str | Path, *, engine, rank: int, world_size: int) -> TrainState:
    """Load DeepSpeed state, this rank's RNG and data position from a local checkpoint folder.

    At another world size than the checkpoint's (elastic resume) the model and the optimizer come
    along — ZeRO partitions (under ZeRO-3 the weights' too) are merged and re-cut for the new
    ranks — and the epoch continues from the position the whole cluster reached: the segment that
    ran is added to ``epoch_history`` and the data source plans what it left among the new ranks.
    """
    folder = Path(folder)
    state = read_train_state(folder)
    if state.world_size == world_size and len(state.data_states) == world_size:
        _load_engine(engine, folder)
        state.epoch = state.data_states[rank]["epoch"]
        state.samples_in_epoch = state.data_states[rank]["samples_in_epoch"]
        rng = folder / "rng" / f"rank_{rank}.pt"
        if rng.is_file():
            set_rng_state(torch.load(rng, weights_only=False))
    else:
        _load_engine_elastic(engine, folder, state.world_size)
        _continue_epoch_elastic(state, folder)
        # the old ranks' RNG streams do not map onto the new ranks: fresh, distinct per rank
        seed = 1_000_003 * (state.step + 1) + rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
    state.world_size = world_size
    return state


def _load_engine(engine, folder: Path) -> None:
    load_path, _ = engine.load_checkpoint(str(folder / "ds"), tag=DS_TAG, load_lr_scheduler_states=False)
    if load_path is None:
        raise ValueError(f"checkpoint {folder}: DeepSpeed state under ds/{DS_TAG} could not be loaded")


def _continue_epoch_elastic(state: TrainState, folder: Path) -> None:
    """Record the segment the old ranks ran of the current epoch; the new ranks continue after it."""
    epochs = {d["epoch"] for d in state.data_states}
    counts = {d["samples_in_epoch"] for d in state.data_states}
    if len(state.data_states) != state.world_size or len(epochs) != 1 or len(counts) != 1:
        raise ValueError(f"checkpoint {folder}: its {state.world_size} ranks are not at one data position "
                         f"({state.data_states}); elastic resume needs that")
    epoch, count = epochs.pop(), counts.pop()
    history = state.epoch_history if state.history_epoch == epoch else []
    done_before = sum(seg[1] for seg in history)  # per-rank samples of earlier segments, counted in `count`
    run = config_mod.from_dict(config_mod.load_yaml_text((folder / "config.yaml").read_text(), str(folder)))
    state.epoch, state.samples_in_epoch, state.history_epoch = epoch, count, epoch
    state.epoch_history = [*history, [state.world_size, count - done_before, run.train.micro_batch_size,
                                      run.train.grad_accum]]


def _load_engine_elastic(engine, folder: Path, old_world: int) -> None:
    """Module weights and optimizer state written by ``old_world`` ranks, for this world size.

    DeepSpeed loads the module (every rank's copy is whole under ZeRO-0/1/2); ZeRO-1/2 optimizer
    partitions (fp32 master weights, Adam moments) are merged from all old ranks' files and cut
    again the way this engine partitions them. ZeRO-3 partitions the weights too: see
    :func:`_load_zero3_elastic`.
    """
    stage = engine.zero_optimization_stage()
    if stage == 3:
        _load_zero3_elastic(engine, folder / "ds", old_world)
        return
    if stage == 0:  # nothing partitioned: DeepSpeed loads it at any world size
        _load_engine(engine, folder)
        return
    load_path, _ = engine.load_checkpoint(str(folder / "ds"), tag=DS_TAG, load_optimizer_states=False,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise ValueError(f"checkpoint {folder}: DeepSpeed state under ds/{DS_TAG} could not be loaded")
    _reshard_zero_optimizer(engine.optimizer, folder / "ds" / DS_TAG, old_world)


def _reshard_zero_optimizer(zero, tag_dir: Path, old_world: int) -> None:
    """Set ``zero``'s partition of the fp32 weights and optimizer state from ``old_world`` saved partitions."""
    # why: deepspeed reads DS_ACCELERATOR on first import and must not load on the driver (docs/pitfalls.md)
    import torch.distributed as dist
    from deepspeed.checkpoint.constants import (
        BASE_OPTIMIZER_STATE,
        GROUP_PADDINGS,
        OPTIMIZER_STATE_DICT,
        SINGLE_PARTITION_OF_FP32_GROUPS,
    )

    parts = []
    for i in range(old_world):
        files = sorted(tag_dir.glob(f"*zero_pp_rank_{i}_mp_rank_00_optim_states.pt"))
        if len(files) != 1:
            raise ValueError(f"checkpoint {tag_dir}: no single ZeRO optimizer file of old rank {i}")
        parts.append(torch.load(files[0], map_location="cpu", weights_only=False)[OPTIMIZER_STATE_DICT])
    rank = dist.get_rank(group=zero.dp_process_group)
    for g, fp32 in enumerate(zero.single_partition_of_fp32_groups):  # saved without their padding
        fp32.data.copy_(_my_part([p[SINGLE_PARTITION_OF_FP32_GROUPS][g] for p in parts], rank, fp32.numel()))
        param = zero.optimizer.param_groups[g]["params"][0]
        saved = [_lean_group_state(p[BASE_OPTIMIZER_STATE], g, p[GROUP_PADDINGS][g]) for p in parts]
        zero.optimizer.state[param] = {
            key: (_my_part([s[key] for s in saved], rank, fp32.numel()).to(param.device)
                  if torch.is_tensor(value) and value.dim() > 0 else value)
            for key, value in saved[0].items()}
    getattr(zero, "_link_all_hp_params", lambda: None)()


def _load_zero3_elastic(engine, ds_dir: Path, old_world: int) -> None:
    """ZeRO-3 state written by ``old_world`` ranks, for this engine: each tensor made whole, then re-cut.

    DeepSpeed's own ``load_checkpoint`` reads only this rank's ZeRO-3 file (``zero_pp_rank_<r>``,
    absent beyond the old world size) and refuses another world size; its universal checkpoint
    needs a converted copy on disk (per node) and ``checkpoint.load_universal`` set before the
    engine is built, and restores neither buffers nor frozen weights. So, in memory: DeepSpeed's
    ``zero_to_fp32`` rebuilds the whole fp32 module (trained weights from the fp32 master
    partitions, frozen ones, buffers), which the engine loads the way its own ZeRO-3 load does
    (gathered, set, partitioned again); the masters and Adam moments, rebuilt per parameter from
    the same layout, are cut into this rank's flat sub-groups as DeepSpeed's universal load cuts
    them (``load_hp_checkpoint_state``: slice r of each parameter, zero-padded).
    """
    import sys

    # why: deepspeed reads DS_ACCELERATOR on first import and must not load on the driver (docs/pitfalls.md)
    import torch.distributed as dist
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(sys.stderr):  # zero_to_fp32 prints its progress; stdout is for results
        weights = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=DS_TAG)
    zero = engine.optimizer
    zero.checkpoint_event_prologue()  # every parameter partitioned, the persistent small ones too
    engine.load_module_state_dict({"module": weights}, strict=True, fetch_z3_params=True)
    whole, scalars = _zero3_saved_optimizer(ds_dir / DS_TAG, old_world)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    rank = dist.get_rank(group=zero.dp_process_group)
    for params, flat in zip(zero.fp16_groups, zero.fp32_partitioned_groups_flat, strict=True):
        assert sum(p.ds_tensor.ds_numel for p in params) == flat.numel()

        def mine(key: str, params=params, flat=flat) -> torch.Tensor:  # this rank's flat sub-group of ``key``
            cut = [_my_part([whole[key][names[id(p)]]], rank, p.ds_tensor.ds_numel) for p in params]
            return torch.cat(cut).to(flat.device)

        flat.data.copy_(mine("fp32"))
        # a step tensor of its own per sub-group: AdamW increments it in place
        step_etc = {k: v.clone() if torch.is_tensor(v) else v for k, v in scalars.items()}
        zero.optimizer.state[flat] = {**step_etc, **{k: mine(k) for k in whole if k != "fp32"}}
    zero.checkpoint_event_epilogue()  # persistent parameters gathered again from their new partitions


def _zero3_saved_optimizer(tag_dir: Path, old_world: int) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Whole fp32 masters and Adam moments by parameter name, and the per-group scalars (Adam's step)."""
    # why: deepspeed reads DS_ACCELERATOR on first import and must not load on the driver (docs/pitfalls.md)
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT, PARAM_SHAPES

    def load(rank: int, kind: str) -> dict[str, Any]:
        files = sorted(tag_dir.glob(f"*zero_pp_rank_{rank}_mp_rank_00_{kind}.pt"))
        if len(files) != 1:
            raise ValueError(f"checkpoint {tag_dir}: no single ZeRO-3 {kind} file of old rank {rank}")
        return torch.load(files[0], map_location="cpu", weights_only=False)

    shapes = load(0, "model_states")[PARAM_SHAPES]  # per sub-group: name → shape, in partition order
    parts = [load(i, "optim_states")[OPTIMIZER_STATE_DICT] for i in range(old_world)]
    states = [p[OPTIMIZER_STATE_DICT]["state"] for p in parts]  # sub-group index → exp_avg, exp_avg_sq, step
    moments = [k for k, v in states[0][0].items() if torch.is_tensor(v) and v.dim() > 0]
    whole = {"fp32": _zero3_whole([p[FP32_FLAT_GROUPS] for p in parts], shapes)}
    whole.update({k: _zero3_whole([[s[g][k] for g in range(len(shapes))] for s in states], shapes) for k in moments})
    return whole, {k: v for k, v in states[0][0].items() if k not in moments}


def _zero3_whole(flats: list[list[torch.Tensor]], shapes: list[dict[str, torch.Size]]) -> dict[str, torch.Tensor]:
    """Whole tensors from ZeRO-3 flat partitions (the layout ``zero_to_fp32`` reads for stage 3).

    ``flats[r][g]`` is old rank r's flat sub-group g: for each parameter of ``shapes[g]`` in order,
    elements ``[r·n, (r+1)·n)`` of it flattened, n = ceil(numel / old ranks), zero-padded at the end.
    """
    world, out = len(flats), {}
    for g, group in enumerate(shapes):
        offset = 0
        for name, shape in group.items():
            numel = math.prod(shape)
            n = -(-numel // world)
            out[name] = torch.cat([f[g][offset : offset + n] for f in flats])[:numel]
            offset += n
        assert offset == flats[0][g].numel(), (g, offset, flats[0][g].numel())
    return out


def _lean_group_state(base_state, group: int, padding: int) -> dict[str, Any]:
    """One saved partition's optimizer state of ``group`` without the padding at its end."""
    state = base_state["state"][group] if isinstance(base_state, dict) else base_state[group]  # rigid / elastic
    return {k: v[: v.numel() - padding] if torch.is_tensor(v) and v.dim() > 0 and isinstance(base_state, dict) else v
            for k, v in state.items()}


def _my_part(partitions: list[torch.Tensor], rank: int, size: int) -> torch.Tensor:
    """Partition ``rank`` of ``size`` elements of the concatenated flat group, zero-padded at the end."""
    flat = torch.cat([p.flatten() for p in partitions])
    mine = flat[rank * size : (rank + 1) * size]
    return torch.cat([mine, mine.new_zeros(size - mine.numel())])
