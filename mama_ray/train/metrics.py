"""Training metrics: per-step accumulation, rank averaging, TensorBoard events and the progress line.

Every ``train.log_every`` optimizer steps the loop reports (through the context, so they reach the
Ray dashboard and Tune): each loss term averaged over the micro-batches and ranks, the learning
rate, both scales (``exp`` of the learnable logits, i.e. the factors that multiply similarities),
samples/s, the fraction of step time spent waiting for data, step time and peak memory. Rank 0 also
writes them as TensorBoard scalars under ``<run_dir>/<run name>/tensorboard`` and prints one
progress line with step and ETA.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from mama_ray import storage


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def utilisation(cfg, step: int, samples_per_s: float, world_size: int, peak_tflops: float) -> dict[str, float]:
    """``tflop_per_pair`` (the FLOP model of ``mama_ray.models.flops``, the phase of ``step``) and
    ``mfu`` per device, from the run's global ``samples_per_s`` and the device's bf16 peak."""
    from mama_ray.models.flops import mfu, pair_flops

    per_pair = pair_flops(cfg, late=step >= cfg.loss.late_loss_step, world_size=world_size).total.model
    return {"tflop_per_pair": per_pair / 1e12, "mfu": mfu(samples_per_s / world_size, per_pair, peak_tflops)}


def rank_mean(values: dict[str, float], world_size: int) -> dict[str, float]:
    """Mean of each value over all ranks (one small all-reduce; identity on one rank)."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return {k: v / world_size for k, v in zip(keys, t.tolist(), strict=True)}


NO_STEP = float(2**53)  # "no non-finite value yet" in StepMeter.first_bad


class StepMeter:
    """Accumulates loss terms and timings between two reports."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}  # each a 0-dim float64 tensor on the terms' device
        self.first_bad: dict[str, torch.Tensor] = {}  # per term: first step with a non-finite value
        self.micro = 0
        self.steps = 0
        self.samples = 0
        self.wait = 0.0
        self.start = time.perf_counter()

    def add_micro(self, terms: dict[str, torch.Tensor], samples: int, wait_s: float, step: int = 0) -> None:
        # Summed where the terms live: reading each one on the host (float(v)) would make a GPU wait
        # for the step to finish every micro-batch. float64 adds exactly as Python floats did.
        # The first non-finite step is kept the same way (device ops only), for the report to name.
        for k, v in terms.items():
            x = v.detach().to(torch.float64)
            self.sums[k] = self.sums[k] + x if k in self.sums else x
            here = torch.full_like(x, NO_STEP).masked_fill(~torch.isfinite(x), float(step))
            self.first_bad[k] = torch.minimum(self.first_bad[k], here) if k in self.first_bad else here
        self.micro += 1
        self.samples += samples
        self.wait += wait_s

    def summary(self, world_size: int) -> dict[str, float]:
        """Mean loss terms over micro-batches and ranks, plus throughput over the window."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        local = {k: float(v) / max(self.micro, 1) for k, v in self.sums.items()}  # the window's one host read
        local["data_wait_frac"] = self.wait / elapsed
        out = rank_mean(local, world_size)
        out["samples_per_s"] = self.samples * world_size / elapsed
        out["step_time_s"] = elapsed / max(self.steps, 1)
        return out

    def non_finite(self, world_size: int) -> dict[str, int]:
        """Terms that were NaN/inf on any rank since the last reset → the first step they were.

        A collective (one small all-reduce) when ``world_size`` > 1: every rank calls it.
        """
        keys = sorted(self.first_bad)
        if not keys:
            return {}
        t = torch.stack([self.first_bad[k] for k in keys]).cpu()
        if world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return {k: int(v) for k, v in zip(keys, t.tolist(), strict=True) if v < NO_STEP}


METRICS_FILE = "metrics.jsonl"  # one JSON object per report, in the run folder


class EventWriter:
    """Rank 0's run log: TensorBoard scalars + ``metrics.jsonl`` in the run folder.

    For an s3:// run folder both are written to a local folder and copied up on :meth:`flush`
    (at every checkpoint and at the end); an existing remote ``metrics.jsonl`` is fetched first so
    a resumed run appends to it.
    """

    def __init__(self, run_uri: str):
        from torch.utils.tensorboard import SummaryWriter

        self.remote = run_uri if storage.is_s3(run_uri) else ""
        if self.remote:
            self._tmp = tempfile.TemporaryDirectory()
            self.local = Path(self._tmp.name)
            old = storage.join(run_uri, METRICS_FILE)
            if storage.exists(old):
                (self.local / METRICS_FILE).write_bytes(storage.read_bytes(old))
        else:
            self.local = Path(storage.filesystem(run_uri)[1])
        self.local.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.local / "tensorboard"))

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():  # validation metrics (val_*) get their own TensorBoard section
            tag = f"val/{k.removeprefix('val_')}" if k.startswith("val_") else f"train/{k}"
            self.writer.add_scalar(tag, v, step)
        with open(self.local / METRICS_FILE, "a") as f:
            f.write(json.dumps({k: float(v) for k, v in metrics.items()}) + "\n")

    def flush(self) -> None:
        self.writer.flush()
        if self.remote:
            storage.upload_dir(self.local, self.remote)

    def close(self) -> None:
        self.flush()
        self.writer.close()


def eta_seconds(step: int, max_steps: int, started: float, start_step: int) -> float:
    """Seconds to ``max_steps`` at this launch's mean rate so far (0 before the first step)."""
    rate = (step - start_step) / max(time.perf_counter() - started, 1e-9)
    return (max_steps - step) / rate if rate > 0 else 0.0


def progress_line(step: int, max_steps: int, metrics: dict[str, float], started: float, start_step: int) -> str:
    """``step 25/60 (42%) loss 3.2104 [val_loss 3.4100] lr 1.00e-03 31.4 samples/s wait 3% eta 0:00:41``."""
    eta = int(eta_seconds(step, max_steps, started, start_step))
    val = f" val_loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
    return (f"step {step}/{max_steps} ({100 * step // max_steps}%) loss {metrics.get('loss', float('nan')):.4f}{val} "
            f"lr {metrics.get('lr', 0.0):.2e} {metrics.get('samples_per_s', 0.0):.1f} samples/s "
            f"wait {100 * metrics.get('data_wait_frac', 0.0):.0f}% eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")


def print_progress(line: str) -> None:
    # Not print(): in a Ray Train worker print is patched to log at INFO on the root logger and
    # also echo to stdout, so every line came out twice. The worker's stdout reaches the driver.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
