"""The one place that turns our config into a DeepSpeed config dict.

Our ``deepspeed`` section names the choices a user makes (ZeRO stage, precision, offload); batch
sizes, accumulation and clipping come from ``train``/``optim`` so they are set once. The optimizer
and the learning-rate schedule are not DeepSpeed's: the loop passes a ``torch.optim.AdamW`` (no CPU
Adam op to compile) and sets the learning rate itself every step (:mod:`mama_ray.schedule`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from mama_ray.config import Config

log = logging.getLogger(__name__)


def resolve_precision(cfg: Config, on_gpu: bool) -> str:
    """``auto`` → bf16 on GPU, fp32 on CPU; an explicit choice is kept (fp16 is not offered)."""
    p = cfg.deepspeed.precision
    return ("bf16" if on_gpu else "fp32") if p == "auto" else p


def cpu_has_fast_bf16() -> bool:
    """Whether torch multiplies bf16 on this CPU with oneDNN (AVX-512), not its slow reference GEMM.

    Honours ``ONEDNN_MAX_CPU_ISA``, so the slow path can be reproduced on any machine.
    """
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def warn_if_slow_cpu_bf16(precision: str, on_gpu: bool) -> bool:
    """Log a warning when bf16 will run on a CPU without oneDNN's bf16 kernels; True if it did.

    torch's CPU bf16 matmul is oneDNN's, which needs AVX-512 (avx512_core). Without it torch falls
    back to a reference GEMM measured ~1000× slower than fp32 (docs/pitfalls.md): a base-width step
    takes hours, and nothing else says why.
    """
    if precision != "bf16" or on_gpu or cpu_has_fast_bf16():
        return False
    log.warning("deepspeed.precision=bf16 on a CPU without AVX-512: torch's bf16 matmul falls back to a "
                "reference kernel ~1000x slower than fp32; set deepspeed.precision=fp32 (or auto) here")
    return True


def _zero_section(cfg: Config, on_gpu: bool) -> dict[str, Any]:
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        # overlap_comm needs CUDA streams; on CPU it only adds buffer copies.
        zero.update(contiguous_gradients=True, overlap_comm=on_gpu)
    if ds.offload_optimizer:  # config.validate refuses it at stage 0
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return zero


def build_deepspeed_config(cfg: Config, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config for one run.

    Args:
        cfg: the run's config (``deepspeed``, ``train.micro_batch_size``/``grad_accum``, ``optim.grad_clip``).
        world_size: number of training workers (data-parallel ranks).
        on_gpu: whether the workers train on GPUs (decides ``precision: auto``).
    Returns:
        A dict for ``deepspeed.initialize(config=...)``.
    """
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "zero_optimization": _zero_section(cfg, on_gpu),
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        # Our client optimizer is torch's AdamW; with offload DeepSpeed would insist on its CPU Adam.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    precision = resolve_precision(cfg, on_gpu)
    if precision == "bf16":
        out["bf16"] = {"enabled": True}
    if cfg.optim.grad_clip > 0:
        out["gradient_clipping"] = cfg.optim.grad_clip
    return out
