"""Image tower: DINOv2 ViT with register tokens (method.md §2.1).

Two features come out of one pass: the pooled feature — the mean of *all* tokens (CLS, registers,
patches) of the last block's output **before** the final LayerNorm ("FLIP-style" ``--pool_feat``)
— and the patch tokens **after** that LayerNorm, whose affine parameters stay frozen (as does the
mask token, which pre-training never uses).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from mama_ray.config import VisionTowerConfig


def vit_config(vcfg: VisionTowerConfig) -> Dinov2WithRegistersConfig:
    """A local Hugging Face config with the sizes of ``vcfg`` (DINOv2 defaults otherwise)."""
    return Dinov2WithRegistersConfig(
        hidden_size=vcfg.hidden_size, num_hidden_layers=vcfg.num_layers,
        num_attention_heads=vcfg.num_heads, mlp_ratio=vcfg.mlp_ratio, image_size=vcfg.image_size,
        patch_size=vcfg.patch_size, num_register_tokens=vcfg.num_registers, qkv_bias=True,
        drop_path_rate=0.0,
    )


def build_vit(vcfg: VisionTowerConfig, weights_dir: Path | None) -> Dinov2WithRegistersModel:
    """Random init from ``vcfg``, or Hugging Face-format weights from a local folder.

    Raises:
        ValueError: the weights' width/patch size disagree with ``vcfg`` (the heads are built from it).
    """
    if weights_dir is None:
        return Dinov2WithRegistersModel(vit_config(vcfg))
    vit = Dinov2WithRegistersModel.from_pretrained(str(weights_dir), local_files_only=True)
    got = (vit.config.hidden_size, vit.config.patch_size, vit.config.num_register_tokens)
    want = (vcfg.hidden_size, vcfg.patch_size, vcfg.num_registers)
    if got != want:
        raise ValueError(f"model.vision.weights {weights_dir}: (hidden_size, patch_size, num_registers)"
                         f" = {got}, but the config says {want}; set model.vision.* to match")
    return vit


class VisionTower(nn.Module):
    """Wraps a ``Dinov2WithRegistersModel``; returns the pooled and the patch features."""

    def __init__(self, vit: Dinov2WithRegistersModel, grad_ckpt: bool = False):
        super().__init__()
        self.vit = vit
        self.num_prefix = 1 + vit.config.num_register_tokens  # CLS + registers precede the patches
        self.hidden_size = vit.config.hidden_size
        vit.embeddings.mask_token.requires_grad_(False)
        vit.layernorm.requires_grad_(False)  # final-LN affine frozen (method.md §2.1, --pool_feat)
        if grad_ckpt:
            # HF checkpoints each block (the original used 4 segments of 3; same maths, less saved).
            vit.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixels`` B×3×H×W normalised → (pooled B×C, patches B×P×C).

        Raises:
            ValueError: H×W is not the size the position embedding was built for (the method
                never interpolates it; HF would do so silently).
        """
        size = self.vit.config.image_size
        if tuple(pixels.shape[-2:]) != (size, size):
            raise ValueError(f"image is {tuple(pixels.shape[-2:])} but the ViT is built for {size}×{size} "
                             "(model.vision.image_size must equal data.image_size)")
        tokens = self.vit.embeddings(pixels)  # B×(1+R+P)×C
        tokens = self.vit.encoder(tokens).last_hidden_state  # output of the last block, pre-LN
        pooled = tokens.mean(dim=1)  # B×C: mean over CLS, registers and patches
        patches = self.vit.layernorm(tokens[:, self.num_prefix:])  # B×P×C, post-LN
        return pooled, patches
