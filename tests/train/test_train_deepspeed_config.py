"""The DeepSpeed config built from ours, per ZeRO stage and precision."""

import logging
import os
import subprocess
import sys

import pytest

from mama_ray import config
from mama_ray.config import ConfigError
from mama_ray.train.deepspeed_config import build_deepspeed_config, warn_if_slow_cpu_bf16


def _cfg(**over):
    return config.load("tiny_cpu", {"train.micro_batch_size": 4, "train.grad_accum": 3, **over})


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stage_and_batch_sizes(stage):
    ds = build_deepspeed_config(_cfg(**{"deepspeed.zero_stage": stage}), world_size=2, on_gpu=False)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert "optimizer" not in ds and "scheduler" not in ds  # ours: torch AdamW + our schedule
    assert "gradient_clipping" not in ds  # the paper does not clip


@pytest.mark.parametrize(("precision", "on_gpu", "bf16"), [
    ("auto", True, True), ("auto", False, False), ("bf16", False, True), ("fp32", True, False)])
def test_precision(precision, on_gpu, bf16):
    ds = build_deepspeed_config(_cfg(**{"deepspeed.precision": precision}), world_size=1, on_gpu=on_gpu)
    assert ds.get("bf16", {}).get("enabled", False) is bf16
    assert "fp16" not in ds


def test_clipping_and_offload():
    cfg = _cfg(**{"optim.grad_clip": 1.5, "deepspeed.zero_stage": 3, "deepspeed.offload_optimizer": True,
                  "deepspeed.offload_param": True})
    ds = build_deepspeed_config(cfg, world_size=4, on_gpu=True)
    assert ds["gradient_clipping"] == 1.5
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert ds["zero_optimization"]["overlap_comm"] is True


def test_offload_needs_zero():
    # refused when the config loads (config.validate), before any DeepSpeed config is built
    with pytest.raises(ConfigError, match="config field 'deepspeed.offload_optimizer': needs deepspeed.zero_stage >= 1"):
        _cfg(**{"deepspeed.zero_stage": 0, "deepspeed.offload_optimizer": True})


def test_bf16_on_a_cpu_without_avx512_warns(caplog):
    # oneDNN capped below AVX-512 in a fresh process: the same check a CPU without it gives
    code = ("import logging; logging.basicConfig(); from mama_ray.train.deepspeed_config import warn_if_slow_cpu_bf16; "
            "print(warn_if_slow_cpu_bf16('bf16', False), warn_if_slow_cpu_bf16('fp32', False), "
            "warn_if_slow_cpu_bf16('bf16', True))")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", "False"]  # only bf16 on the CPU
    assert "deepspeed.precision=fp32" in out.stderr
    with caplog.at_level(logging.WARNING):  # fp32, or a GPU, never warns here either
        assert not warn_if_slow_cpu_bf16("fp32", False) and not warn_if_slow_cpu_bf16("bf16", True)
    assert not caplog.records
