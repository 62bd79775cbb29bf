"""Parameter counts per part of a MamaModel (total and trainable).

Given a config instead of a model, the model is built on PyTorch's ``meta`` device: shapes
only, no memory, so the ``base`` preset's 2.7B-parameter LLM costs nothing to count.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mama_ray.config import Config
from mama_ray.data.tokenizer import build_tiny_tokenizer
from mama_ray.models.mama import build_model

# Embedding rows BioMedLM's tokenizer has before the added special tokens (its config.json).
BIOMEDLM_VOCAB = 28896

# Part name → attribute prefixes of MamaModel parameters; LoRA matrices are split off the trunk.
PARTS = {
    "vision": ("vision.",),
    "text": ("text.",),
    "projections": ("image_proj.", "text_proj."),
    "local_image_head": ("local_image_head.",),
    "local_text_head": ("local_text_head.",),
    "mv_head": ("mv_head.",),
    "scales": ("logit_scale", "local_scale"),
}


def _part(name: str) -> str:
    if "lora_" in name:
        return "lora"
    for part, prefixes in PARTS.items():
        if name.startswith(prefixes):
            return part
    raise AssertionError(f"parameter {name} belongs to no part")


def _meta_model(cfg: Config, vocab_size: int | None) -> nn.Module:
    text = dataclasses.replace(cfg.model.text, weights="", vocab_size=vocab_size or cfg.model.text.vocab_size)
    vision = dataclasses.replace(cfg.model.vision, weights="")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, text=text, vision=vision))
    with torch.device("meta"):
        return build_model(cfg, build_tiny_tokenizer())


def count_parameters(model_or_cfg: nn.Module | Config, vocab_size: int | None = None) -> dict:
    """Total and trainable parameters per part.

    Args:
        model_or_cfg: a built model, or a config (then built on the meta device, no weights read).
        vocab_size: with a config, embedding rows of the text trunk (e.g. ``BIOMEDLM_VOCAB``);
            default ``cfg.model.text.vocab_size``, at least the tiny tokenizer's length.
    Returns:
        ``{"parts": {name: {"total": n, "trainable": n}}, "total": n, "trainable": n}``; parts
        are vision, text (the frozen trunk), lora, projections, local_image_head,
        local_text_head, mv_head, scales.
    """
    model = _meta_model(model_or_cfg, vocab_size) if isinstance(model_or_cfg, Config) else model_or_cfg
    parts = {name: {"total": 0, "trainable": 0} for name in ("vision", "text", "lora", *list(PARTS)[2:])}
    for name, p in model.named_parameters():
        row = parts[_part(name)]
        row["total"] += p.numel()
        row["trainable"] += p.numel() if p.requires_grad else 0
    return {"parts": parts,
            "total": sum(r["total"] for r in parts.values()),
            "trainable": sum(r["trainable"] for r in parts.values())}


def format_param_table(counts: dict) -> str:
    """A fixed-width text table of :func:`count_parameters`' result (millions)."""
    lines = [f"{'part':<18}{'total':>14}{'trainable':>14}"]
    rows = [*counts["parts"].items(), ("all", counts)]
    for name, r in rows:
        lines.append(f"{name:<18}{r['total'] / 1e6:>13.2f}M{r['trainable'] / 1e6:>13.2f}M")
    return "\n".join(lines)
