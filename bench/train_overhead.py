"""Step time of our Ray Train + DeepSpeed loop vs. a plain single-process PyTorch loop.

Both train the same model (the ``tiny`` preset at ``data.image_size``) on the same fixed batch
with every loss term on, AdamW and the same learning rates; the plain loop is what one would
write without Ray or DeepSpeed. Ours is the real ``TorchTrainer`` (1 worker, so the per-process
batch is the same) running ``mama_ray.train.loop.train_loop``; its step time is the loop's own
``step_time_s`` metric (wall time per optimizer step, data wait and reports included) over the
logged windows after the first. Both compute with the same number of torch threads: the worker
uses its ``scaling.cpus_per_worker`` (``--cpus-per-worker``), and so does the plain loop.

    python bench/train_overhead.py --steps 40 --micro-batch 8 --stages 2 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mama_ray import config  # noqa: E402


def fixed_batch(cfg, tokenizer) -> dict[str, torch.Tensor]:
    """One micro-batch shaped like the pipeline's: gray uint8 views and captions with separators."""
    from mama_ray.data import captions
    from mama_ray.data.tokenizer import token_arrays

    b, s = cfg.train.micro_batch_size, cfg.data.image_size
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.integers(0, 255, (b, 1, s, s), dtype=np.uint8)).expand(-1, 3, -1, -1)
    text = f"{captions.BOS} Breast composition: The breast is dense {captions.SEP} Findings: no mass {captions.SEP} {captions.EOS}"
    enc = {k: torch.from_numpy(v) for k, v in token_arrays(tokenizer, [text] * b, cfg.text.max_len).items()}
    return {"image1": img, "image2": img.flip(-1), **enc}


class Repeat:
    """Batch source that yields the same batch forever (no data cost in either loop)."""

    def __init__(self, cfg, rank: int, world_size: int):
        from mama_ray.data.tokenizer import load_tokenizer

        self.batch = fixed_batch(cfg, load_tokenizer(cfg))

    def epoch_batches(self, epoch: int, skip_samples: int):
        while True:
            yield self.batch


def worker_threads(cfg) -> int:
    """Torch threads a training worker computes with (what ``launch.train_func`` sets)."""
    return max(1, int(cfg.scaling.cpus_per_worker))


def plain_step_times(cfg, steps: int) -> list[float]:
    """Seconds per optimizer step of a bare PyTorch loop (no Ray, no DeepSpeed), worker's thread count."""
    from mama_ray.data.tokenizer import load_tokenizer
    from mama_ray.losses import MamaObjective
    from mama_ray.models import build_model

    torch.set_num_threads(worker_threads(cfg))
    torch.manual_seed(cfg.run.seed)
    tok = load_tokenizer(cfg)
    model = build_model(cfg, tok).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
                            weight_decay=cfg.optim.weight_decay)
    objective, batch, times = MamaObjective(cfg.loss), fixed_batch(cfg, tok), []
    for step in range(steps):
        t0 = time.perf_counter()
        out1 = model(batch["image1"], batch["input_ids"], batch["attention_mask"], batch["sep_mask"])
        out2 = model.encode_image(batch["image2"], local=False)
        loss = objective(out1, out2, step)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def ours_step_time(cfg, stage: int, workers: int, steps: int, log_every: int) -> float:
    """Mean ``step_time_s`` of the Ray Train + DeepSpeed loop over its logged windows after the first."""
    from mama_ray.layout import read_metrics
    from mama_ray.train.launch import build_trainer, run_uri

    with tempfile.TemporaryDirectory() as tmp:
        run = config.override(cfg, {"deepspeed.zero_stage": stage, "scaling.num_workers": workers,
                                    "storage.run_dir": tmp, "run.name": f"bench-z{stage}-w{workers}",
                                    "train.log_every": log_every, "train.checkpoint_every": steps})
        build_trainer(run, data_factory=Repeat).fit()
        windows = [m["step_time_s"] for m in read_metrics(run_uri(run))][1:]
    return statistics.mean(windows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    ap.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs (= torch threads) of the worker and the plain loop")
    args = ap.parse_args()
    os.environ["DS_ACCELERATOR"] = "cpu"
    cfg = config.load("tiny_cpu", {"train.micro_batch_size": args.micro_batch, "train.max_steps": args.steps,
                                   "optim.warmup_steps": 1, "loss.late_loss_step": 0, "train.grad_accum": 1,
                                   "train.eval_at_end": False, "scaling.cpus_per_worker": args.cpus_per_worker})
    load_before = os.getloadavg()[0]
    log_every = max(1, args.steps // 4)
    plain = statistics.mean(plain_step_times(cfg, args.steps)[log_every:])
    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    rows = [("plain PyTorch, 1 process", "-", plain)]
    rows += [("Ray Train + DeepSpeed, 1 worker", f"ZeRO-{s}", ours_step_time(cfg, s, 1, args.steps, log_every))
             for s in args.stages]
    ray.shutdown()
    b, threads = args.micro_batch, worker_threads(cfg)
    print(f"tiny preset, {cfg.data.image_size} px, micro-batch {b}, text {cfg.text.max_len} tokens, all loss terms, "
          f"{args.steps} steps (first {log_every} not timed), CPU fp32, {threads} torch thread(s) in both loops; "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print("| loop | ZeRO | threads | step time (ms) | samples/s | ratio to plain |\n|---|---|---|---|---|---|")
    for name, zero, t in rows:
        print(f"| {name} | {zero} | {threads} | {1000 * t:.1f} | {b / t:.1f} | {t / plain:.2f} |")


if __name__ == "__main__":
    main()
