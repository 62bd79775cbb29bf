"""Pretrain MaMA with Ray Train + DeepSpeed; with no arguments, the small default run on a laptop.

    python jobs/pretrain.py                                   # synthetic data, tiny model, 2 CPU workers
    ray job submit -- python jobs/pretrain.py --config base --set scaling.num_workers=8
    python jobs/pretrain.py --resume-from s3://bucket/runs/old/checkpoint_00004000

Starting the same run (same run.name and storage.run_dir) again resumes from its latest
checkpoint; a run that already reached train.max_steps is reported as complete, not retrained.
The last two lines printed are ``run_dir: URI`` and ``checkpoint: URI``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from mama_ray.config import add_config_args, load_from_args  # noqa: E402
from mama_ray.runtime import MIN_TRAINING_CPUS, init_ray, run_main  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(ap)
    ap.add_argument("--resume-from", default="", metavar="URI",
                    help="checkpoint to start from when the run has none of its own (local or s3://)")
    args = ap.parse_args()
    cfg = load_from_args(args)
    if not cfg.scaling.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # reaches local workers; attached ones get it via train_func
    init_ray(num_cpus=max(MIN_TRAINING_CPUS, os.cpu_count() or 1))
    from mama_ray.train.launch import run_pretrain

    summary = run_pretrain(cfg, resume_from=args.resume_from)
    import ray

    ray.shutdown()  # flushes the workers' streamed logs, so the summary really is the last output
    if summary.eval_table:
        print(summary.eval_table)
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    run_main(main)
