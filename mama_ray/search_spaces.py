"""Named Ray Tune search spaces, keyed by dotted config fields.

A space maps the same dotted names ``--set`` takes (``loss.mv_weight``, ``model.lora.r``, …) to Ray
Tune domains; a trial's sample is applied to the sweep's config with
``mama_ray.config.override(cfg, sample)`` — the one override function the CLI uses too — so a
misspelt key fails before any trial starts (``mama_ray.sweep.check_space``).

The value ranges of ``loss_weights``/``lora``/``lr``/``paper`` are for the paper's scale
(``--config base``: 40 000 steps, late-loss step 8000); ``tiny`` is the default laptop sweep over
the ``tiny_tune`` preset (12 steps, late-loss step 6).
"""

from __future__ import annotations

from typing import Any

from ray import tune

from mama_ray.config import ConfigError

LOSS_WEIGHTS: dict[str, Any] = {
    "loss.clip2_weight": tune.uniform(0.25, 2.0),  # second-view CLIP
    "loss.mv_weight": tune.uniform(0.25, 2.0),  # multi-view NT-Xent
    "loss.sla_weight": tune.uniform(0.25, 2.0),  # symmetric local alignment
    "loss.late_loss_step": tune.choice([2000, 4000, 8000, 12000]),  # when the three join (paper: 8000)
}

LORA: dict[str, Any] = {
    "model.lora.r": tune.choice([4, 8, 16, 32, 64]),  # paper: 8
    "model.lora.alpha": tune.choice([8, 16, 32, 64]),  # paper: 32 (scale = alpha / r)
}

LR: dict[str, Any] = {
    "optim.lr": tune.loguniform(1e-5, 2e-4),  # paper: 4e-5
}

TINY: dict[str, Any] = {
    "optim.lr": tune.loguniform(3e-4, 3e-3),
    "loss.mv_weight": tune.choice([0.5, 1.0]),
    "model.lora.r": tune.choice([4, 8]),
}

SPACES: dict[str, dict[str, Any]] = {
    "loss_weights": LOSS_WEIGHTS,
    "lora": LORA,
    "lr": LR,
    "paper": {**LOSS_WEIGHTS, **LORA, **LR},
    "tiny": TINY,
}


def get_space(name: str) -> dict[str, Any]:
    """The search space called ``name``; a :class:`ConfigError` lists the names there are."""
    if name not in SPACES:
        raise ConfigError(f"unknown search space {name!r}; named spaces: {', '.join(SPACES)}", "tune.space")
    return dict(SPACES[name])
