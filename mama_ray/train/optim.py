"""AdamW parameter groups and the per-step learning rates (method.md §4, §3 late loss).

Groups are fixed for the whole run, so DeepSpeed's flat buffers never change:

* ``main`` — every trainable parameter used from step 0 (weight decay ``optim.weight_decay``);
* ``late`` — the modules only the late terms use (local SLA heads and ``local_scale``:
  ``model.local_parameters()``, plus the multi-view head). Their learning rate is 0 before ``loss.late_loss_step``,
  which freezes them exactly like the original's ``requires_grad=False`` (decoupled weight decay is
  scaled by the learning rate, so it is 0 too), and it follows the schedule from that step on —
  computed from the step, so a run resumed past the late step has them trainable (the original,
  which unfroze at ``step == 8000`` exactly, would not).
* with ``optim.decay_all: false`` each of the two is split into a decayed part (≥2-D weights) and a
  ``*_no_decay`` part (biases, norms, scales); the paper decays everything (``decay_all: true``).

Frozen parameters (``requires_grad=False``, e.g. the LoRA-wrapped text trunk) are left out.
"""

from __future__ import annotations

import torch

from mama_ray.config import Config
from mama_ray.schedule import lr_for


def late_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters only the late terms train: local heads + ``local_scale``, and the multi-view head.

    The multi-view head has no gradient before the late step; torch AdamW would skip it, but
    DeepSpeed's flat buffers hand it a zero gradient and weight decay would shrink it, so it is
    held still by the same lr-0 group.
    """
    mv = getattr(model, "mv_head", None)
    return [*model.local_parameters(), *(mv.parameters() if mv is not None else [])]


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """AdamW parameter groups (each with a ``name``), trainable parameters only; empty groups dropped."""
    late_ids = {id(p) for p in late_parameters(model)}
    buckets: dict[str, list[torch.nn.Parameter]] = {"main": [], "main_no_decay": [], "late": [], "late_no_decay": []}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        name = "late" if id(p) in late_ids else "main"
        if not cfg.optim.decay_all and p.ndim < 2:
            name += "_no_decay"
        buckets[name].append(p)
    wd = cfg.optim.weight_decay
    return [
        {"name": name, "params": ps, "weight_decay": 0.0 if name.endswith("_no_decay") else wd, "lr": cfg.optim.min_lr}
        for name, ps in buckets.items()
        if ps
    ]


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """torch AdamW over :func:`param_groups` (passed to DeepSpeed as the client optimizer)."""
    o = cfg.optim
    return torch.optim.AdamW(param_groups(model, cfg), lr=o.min_lr, betas=tuple(o.betas), eps=o.eps)


def group_lr(name: str, cfg: Config, step: int) -> float:
    """Learning rate of group ``name`` for the optimizer step with 0-based index ``step``."""
    if name.startswith("late") and step < cfg.loss.late_loss_step:
        return 0.0
    return lr_for(cfg, step)


def set_learning_rates(param_groups_: list[dict], cfg: Config, step: int) -> float:
    """Set every group's lr for optimizer step ``step``; returns the scheduled (main) lr."""
    for g in param_groups_:
        g["lr"] = group_lr(g["name"], cfg, step)
    return lr_for(cfg, step)
