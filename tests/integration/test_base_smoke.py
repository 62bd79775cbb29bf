"""The paper path in miniature: the ``base_smoke`` preset (base widths, LoRA on a frozen GPT-2 trunk,
activation checkpointing on both towers, bf16) under real DeepSpeed ZeRO-2 and ZeRO-3.

The towers start from Hugging Face-format folders written here with ``save_pretrained`` (random,
base-shaped), so the weight-loading path of ``base`` runs too, including the resize of the
embeddings to the tokenizer and peft's LoRA over a frozen, checkpointed trunk.

On a CPU without oneDNN's bf16 kernels (no AVX-512) torch multiplies bf16 with a reference GEMM
~1000× slower than fp32 (docs/pitfalls.md): there the towers are narrowed (same depth, heads,
LoRA, checkpointing and precision) so the module takes minutes, not hours.
"""

import math
from pathlib import Path

import pytest
import torch
from transformers import Dinov2WithRegistersModel, GPT2Config, GPT2Model

from mama_ray import config
from mama_ray.layout import load_model_from_checkpoint, read_metrics
from mama_ray.models.vision import vit_config
from mama_ray.train.context import LocalContext
from mama_ray.train.deepspeed_config import cpu_has_fast_bf16
from mama_ray.train.launch import PipelineSource, build_trainer, run_uri
from mama_ray.train.loop import train_loop

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NARROW = {} if cpu_has_fast_bf16() else {
    "model.vision.hidden_size": 48, "model.vision.num_heads": 12,  # base: 768, 12 heads
    "model.text.hidden_size": 80, "model.text.num_heads": 20}  # base: 2560, 20 heads


@pytest.fixture(scope="module")
def smoke_inputs(tmp_path_factory, write_shards):
    """``(shards, vision weights, text weights)``: 40 studies, and the two towers in HF format."""
    root = tmp_path_factory.mktemp("smoke")
    write_shards(root / "shards", 40, seed=3, side=72)
    cfg = config.load("base_smoke", NARROW)
    torch.manual_seed(0)
    Dinov2WithRegistersModel(vit_config(cfg.model.vision)).save_pretrained(root / "dinov2")
    t = cfg.model.text  # a vocabulary smaller than the tokenizer's: build_trunk must resize it
    GPT2Model(GPT2Config(vocab_size=300, n_positions=t.max_positions, n_embd=t.hidden_size, n_layer=t.num_layers,
                         n_head=t.num_heads)).save_pretrained(root / "gpt2")
    return root


def smoke_cfg(root: Path, **over):
    return config.load("base_smoke", {
        "data.shards": str(root / "shards"), "model.vision.weights": str(root / "dinov2"),
        "model.text.weights": str(root / "gpt2"), "storage.cache_dir": str(root / "cache"),
        "storage.run_dir": str(root / "runs"), "data.prefetch_next_epoch": False, **NARROW, **over})


class Capture:
    """``build_model`` that keeps the model and a copy of its initial weights (in this process)."""

    def __init__(self):
        self.model, self.initial = None, {}

    def __call__(self, cfg, tokenizer):
        from mama_ray.models import build_model

        self.model = build_model(cfg, tokenizer)
        self.initial = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        return self.model


def _final(model, stage):
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def _run_local(cfg, root, build, resume_from=None):
    with LocalContext(root, keep=4, resume_from=resume_from) as ctx:
        train_loop(cfg, ctx, PipelineSource(cfg, 0, 1, local_ranks=1), run_uri="", build_model=build)
    return ctx


@pytest.fixture(scope="module")
def straight(smoke_inputs, ray_session):
    """ZeRO-2 bf16, one process: 4 steps, checkpoints at 2 and 4, the model kept; and the same run
    resumed from step 2. Both before any ZeRO-3 engine exists in this process: ZeRO-3 replaces
    ``torch.nn.functional.linear`` process-wide, which changes bf16 rounding (docs/pitfalls.md)."""
    cfg = smoke_cfg(smoke_inputs, **{"scaling.num_workers": 1, "run.name": "straight"})
    capture = Capture()
    ctx = _run_local(cfg, smoke_inputs / "straight", capture)
    resumed = _run_local(cfg, smoke_inputs / "resumed", None,
                         resume_from=str(smoke_inputs / "straight" / "checkpoint_00000002"))
    return cfg, ctx, capture, resumed


def _frozen_and_trained(capture, stage):
    final = _final(capture.model, stage)
    trainable = {n for n, p in capture.model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.bfloat16 for p in capture.model.parameters())  # DeepSpeed bf16 weights
    frozen = [n for n in final if n not in trainable]
    assert any("lora_A" in n for n in trainable) and any(".c_attn.base_layer" in n for n in frozen)
    assert not any("lora" in n for n in frozen) and any(n.startswith("vision.vit.encoder") for n in trainable)
    # frozen: bitwise the loaded weights (cast to bf16 once); nothing in the trunk moved
    assert all(torch.equal(final[n], capture.initial[n].to(torch.bfloat16)) for n in frozen)
    return final, trainable


def test_smoke_preset_trains_in_bf16_zero2(straight):
    cfg, ctx, capture, _ = straight
    assert [r["step"] for r in ctx.reports] == [1, 2, 3, 4]
    for r in ctx.reports:
        assert all(math.isfinite(r[k]) for k in ("loss", "clip_loss", "clip2_loss", "mv_loss", "sla_loss"))
    assert all(r["sla_loss"] > 0 and r["mv_loss"] > 0 for r in ctx.reports[2:])  # late terms from step 2
    final, trainable = _frozen_and_trained(capture, 2)
    changed = [n for n in trainable if not torch.equal(final[n], capture.initial[n].to(torch.bfloat16))]
    for group in ("vision.vit.encoder", "lora_B", "image_proj", "text_proj", "local_image_head", "mv_head"):
        assert any(group in n for n in changed), group


def test_bf16_checkpoint_resumes_exactly(straight):
    _, ctx, _, resumed = straight
    assert [r["step"] for r in resumed.reports] == [3, 4]
    for a, b in zip(resumed.reports, ctx.reports[2:], strict=True):
        for k in ("loss", "clip_loss", "mv_loss", "sla_loss"):
            assert a[k] == b[k], k  # same process, same arithmetic: bit for bit


def test_bf16_checkpoint_holds_fp32_master_weights(straight, smoke_inputs):
    cfg, _, capture, _ = straight
    model, _, loaded_cfg, state = load_model_from_checkpoint(str(smoke_inputs / "straight" / "checkpoint_00000004"))
    assert state.step == 4 and loaded_cfg.deepspeed.precision == "bf16"
    final = _final(capture.model, 2)
    w = dict(model.named_parameters())["image_proj.weight"]
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.bfloat16(), final["image_proj.weight"], rtol=0, atol=0)  # rounds to the bf16 copy
    assert not torch.equal(w, w.bfloat16().float())  # and keeps the bits bf16 drops


def test_smoke_preset_trains_in_bf16_zero3(smoke_inputs, ray_session):
    cfg = smoke_cfg(smoke_inputs, **{"scaling.num_workers": 1, "run.name": "z3", "deepspeed.zero_stage": 3,
                                     "train.max_steps": 3})
    capture = Capture()
    ctx = _run_local(cfg, smoke_inputs / "z3", capture)
    assert [r["step"] for r in ctx.reports] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in ctx.reports) and ctx.reports[-1]["sla_loss"] > 0
    final, trainable = _frozen_and_trained(capture, 3)
    assert any("lora_B" in n and final[n].abs().sum() > 0 for n in trainable)  # LoRA B starts at 0


def test_smoke_preset_on_two_ray_workers_zero3(smoke_inputs, ray_session):
    cfg = smoke_cfg(smoke_inputs, **{"run.name": "ray-z3", "deepspeed.zero_stage": 3, "train.max_steps": 3,
                                     "train.checkpoint_every": 3})
    build_trainer(cfg).fit()
    logged = read_metrics(run_uri(cfg))
    assert [m["step"] for m in logged] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) for m in logged) and logged[-1]["sla_loss"] > 0
    model, *_ = load_model_from_checkpoint(f"{run_uri(cfg)}/checkpoint_00000003")
    assert all(torch.isfinite(p).all() for p in model.parameters())
