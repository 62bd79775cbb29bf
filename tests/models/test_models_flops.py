"""FLOP model: hand-worked counts for tiny layers, the base numbers, and PyTorch's own FLOP counter.

The measured side is ``torch.utils.flop_counter.FlopCounterMode`` (it counts matmuls, convolutions
and their backward exactly as executed) on the tiny model with eager attention (the CPU SDPA
kernel is not one it counts). The model and the counter agree exactly; the tolerance allows
0.1 % so a future counting detail (e.g. a bias add) does not fail it spuriously.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mama_ray import config
from mama_ray.config import TextTowerConfig, VisionTowerConfig
from mama_ray.data import captions
from mama_ray.data.tokenizer import token_arrays
from mama_ray.losses import MamaObjective
from mama_ray.models import build_model
from mama_ray.models.flops import (
    attention,
    block_forward,
    block_ops,
    linear,
    mfu,
    pair_flops,
    peak_tflops,
    text_flops,
    vit_flops,
)
from mama_ray.train.loop import TwoViews

TOL = 1e-3


def test_linear_and_attention_by_hand():
    assert linear(5, 3, 4) == 2 * 5 * 3 * 4 == 120
    assert attention(6, 8) == 2 * (2 * 36 * 8) == 1152  # QKᵀ and A·V


def test_gpt2_block_by_hand():
    # d=4, 3 tokens: c_attn 4→12, c_proj 4→4, c_fc 4→16, c_proj 16→4 = 192 MACs per token
    mm, att = block_forward(block_ops("gpt2", 4, 4), seq=3, width=4)
    assert mm == 2 * 3 * (48 + 16 + 64 + 64) == 1152
    assert att == 4 * 9 * 4 == 144


def test_vit_by_hand():
    v = VisionTowerConfig(image_size=4, patch_size=2, hidden_size=4, num_layers=1, num_heads=1,
                          mlp_ratio=2, num_registers=1)
    # 4 patches + CLS + 1 register = 6 tokens; patch embed 12→4 on 4 patches
    embed = 2 * 4 * 12 * 4  # 384
    block = 6 * 2 * (4 * 4 * 3 + 4 * 4 + 4 * 8 + 8 * 4) + 4 * 36 * 4  # 1536 + 576
    f = vit_flops(v)
    assert (f.forward, f.backward, f.recompute) == (embed + block, embed + 2 * block, 0)  # embed: dW only
    assert vit_flops(dataclasses.replace(v, grad_ckpt=True)).recompute == block


def test_frozen_text_trunk_with_lora_by_hand():
    t = TextTowerConfig(hidden_size=4, num_layers=2, num_heads=1)
    trunk, lora = text_flops(t, lora_r=2, lora_targets=["c_attn"], lora_on=True, max_len=3)
    assert trunk.forward == 2 * (1152 + 144)
    # layer 1: every input gradient (1152) + attention 2×; layer 0: c_attn reads the frozen
    # embeddings, so its input gradient (2·3·4·12 = 288) is skipped
    assert trunk.backward == (1152 + 288) + (1152 - 288 + 288)
    # adapter per layer: A 4→2, B 2→12 on 3 tokens = 48 + 144
    assert lora.forward == 2 * (48 + 144)
    # layer 1: 2× forward; layer 0: dB 144 + dA 48 + rank-2 gradient 144, no dX through A
    assert lora.backward == 2 * 192 + (144 + 48 + 144)
    assert trunk.recompute == lora.recompute == 0


def test_text_grad_ckpt_computes_every_input_gradient():
    t = TextTowerConfig(hidden_size=4, num_layers=2, num_heads=1, grad_ckpt=True)
    trunk, lora = text_flops(t, lora_r=2, lora_targets=["c_attn"], lora_on=True, max_len=3)
    assert (trunk.backward, trunk.recompute) == (2 * (1152 + 288), 2 * (1152 + 144))
    assert (lora.backward, lora.recompute) == (2 * 2 * 192, 2 * 192)
    # no LoRA: without checkpointing no gradient enters the trunk; with it, HF still runs one
    no_lora = text_flops(dataclasses.replace(t, grad_ckpt=False), 2, ["c_attn"], False, 3)[0]
    assert (no_lora.backward, no_lora.recompute) == (0, 0)
    assert text_flops(t, 2, ["c_attn"], False, 3)[0].backward == 2 * (1152 + 288)


def test_trainable_trunk_is_twice_forward():
    t = TextTowerConfig(hidden_size=4, num_layers=2, num_heads=1, train_trunk=True)
    trunk, lora = text_flops(t, 2, ["c_attn"], True, 3)
    assert trunk.backward == 2 * trunk.forward and lora.backward == 2 * lora.forward


def test_base_numbers():
    cfg = config.from_dict({"model": {"preset": "base"}})
    vit_fwd = 12 * (1374 * 2 * (4 * 768 ** 2 + 8 * 768 ** 2) + 4 * 1374 ** 2 * 768) + 2 * 1369 * 588 * 768
    gpt_fwd = 32 * (144 * 2 * 12 * 2560 ** 2 + 4 * 144 ** 2 * 2560)
    early, late = pair_flops(cfg, late=False), pair_flops(cfg, late=True)
    assert early.components["vision"].forward == vit_fwd  # ≈ 304 GFLOP per 518-px image
    assert early.components["text"].forward == gpt_fwd  # ≈ 732 GFLOP per 144-token caption
    assert late.components["vision"].forward == 2 * vit_fwd
    # SLA: 36×36×1369×10 dot products of 512 per micro-batch, fwd + 2× bwd, per pair
    assert late.components["sla"].model == 3 * 2 * 36 * 1369 * 10 * 512
    assert early.components["sla"].model == early.components["local_image_head"].model == 0
    assert early.components["mv_head"].backward == 0 < early.components["mv_head"].forward
    assert 2.3e12 < early.total.model < 2.4e12
    assert 3.0e12 < late.total.model < 4.0e12  # the estimate: 3–4 TFLOP per pair, late
    ckpt = config.override(cfg, {"model.vision.grad_ckpt": True, "model.text.grad_ckpt": True})
    late_ckpt = pair_flops(ckpt, late=True)
    # checkpointing adds layer 0's input gradients of c_attn and its adapter's A (HF's input-grad hook) …
    assert late_ckpt.total.model - late.total.model == 2 * 144 * 2560 * 7680 + 2 * 144 * 2560 * 8
    # … and recomputes the blocks of both views and of the trunk, adapters included
    embed = 2 * 1369 * 588 * 768
    lora_fwd = 32 * 2 * 144 * 8 * (2560 + 7680)
    assert late_ckpt.total.recompute == 2 * (vit_fwd - embed) + gpt_fwd + lora_fwd


def test_peak_and_mfu():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("Some Future GPU") is None
    assert mfu(100.0, 3e12, 1000.0) == pytest.approx(0.3)


# ---- measured against PyTorch's FLOP counter ----------------------------------------------------


def _tiny(**overrides) -> tuple[config.Config, torch.nn.Module]:
    cfg = config.load("tiny_cpu", {"train.micro_batch_size": 4, "text.max_len": 40, **overrides})
    torch.manual_seed(0)
    model = build_model(cfg).train()
    model.vision.vit.set_attn_implementation("eager")  # CPU SDPA is not counted by FlopCounterMode
    lm = model.text.lm.get_base_model() if hasattr(model.text.lm, "get_base_model") else model.text.lm
    lm.set_attn_implementation("eager")
    return cfg, model


def _batch(cfg, model) -> dict[str, torch.Tensor]:
    b, s = cfg.train.micro_batch_size, cfg.data.image_size
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 255, (b, 1, s, s), dtype=torch.uint8, generator=g)
    texts = [f"{captions.BOS}Breast composition: dense{captions.SEP} Findings: no mass{captions.SEP}"
             f"{' Impressions: benign' + captions.SEP if i % 2 else ''}{captions.EOS}" for i in range(b)]
    enc = {k: torch.from_numpy(v) for k, v in token_arrays(model.tokenizer, texts, cfg.text.max_len).items()}
    return {"image1": img, "image2": img.flip(-1), **enc}


def test_vit_and_gpt2_forward_match_the_counter():
    cfg, model = _tiny()
    batch = _batch(cfg, model)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.vision(batch["image1"].expand(-1, 3, -1, -1).float())
    assert fc.get_total_flops() == pytest.approx(4 * vit_flops(cfg.model.vision).forward, rel=TOL)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.text(batch["input_ids"], batch["attention_mask"])
    trunk, lora = text_flops(cfg.model.text, cfg.model.lora.r, cfg.model.lora.targets, True, 40)
    assert fc.get_total_flops() == pytest.approx(4 * (trunk.forward + lora.forward), rel=TOL)


@pytest.mark.parametrize("overrides", [
    {"model.text.train_trunk": True},  # the tiny_cpu default
    {"model.text.train_trunk": False},  # the method: frozen trunk + LoRA
    {"model.text.train_trunk": False, "model.vision.grad_ckpt": True, "model.text.grad_ckpt": True},
    {"model.text.train_trunk": False, "model.lora.enabled": False, "model.text.grad_ckpt": True},
], ids=["trainable-trunk", "frozen-lora", "frozen-lora-ckpt", "frozen-no-lora-ckpt"])
def test_training_step_matches_the_counter(overrides):
    """One micro-batch through the loop's two-view forward, objective and backward, both phases."""
    cfg, model = _tiny(**overrides)
    batch = _batch(cfg, model)
    sentences = int(batch["sep_mask"].sum(1).max())  # padded slots M
    wrapped, objective = TwoViews(model), MamaObjective(cfg.loss)
    for late in (False, True):
        step = cfg.loss.late_loss_step if late else 0
        with FlopCounterMode(display=False) as fc:
            out1, out2 = wrapped(batch["image1"], batch["input_ids"], batch["attention_mask"],
                                 batch["sep_mask"], batch["image2"] if late else None)
            objective(out1, out2, step)["loss"].backward()
        model.zero_grad(set_to_none=True)
        want = pair_flops(cfg, late, sentences=sentences).total.hardware * cfg.train.micro_batch_size
        assert fc.get_total_flops() == pytest.approx(want, rel=TOL), ("late" if late else "early")
