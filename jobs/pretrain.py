"""Pretrain MaMA with Ray Train + DeepSpeed; with no arguments, the small default run on a laptop.

    mama-pretrain                                             # synthetic data, tiny model, 2 CPU workers
    python jobs/pretrain.py --log-level warning               # the same from a checkout, quieter
    ray job submit -- python jobs/pretrain.py --config base --set scaling.num_workers=8
    mama-pretrain --resume-from s3://bucket/runs/old/checkpoint_00004000

Starting the same run (same run.name and storage.run_dir) again resumes from its latest
checkpoint; a run that already reached train.max_steps is reported as complete, not retrained.
The last two lines printed are ``run_dir: URI`` and ``checkpoint: URI``.
"""

from __future__ import annotations

import importlib.util
import os
import sys

if importlib.util.find_spec("mama_ray") is None:  # `python jobs/pretrain.py` from a checkout without `pip install -e .`
    print("error: mama_ray is not installed; run `pip install -e .` in the checkout (README.md)", file=sys.stderr)
    sys.exit(2)  # the exit code of a usage error (mama_ray.runtime.EXIT_USAGE)

from mama_ray.config import add_config_args, load_from_args  # noqa: E402
from mama_ray.runtime import (  # noqa: E402
    MIN_TRAINING_CPUS,
    ensure_deepspeed_accelerator,
    init_ray,
    job_parser,
    parse_args,
    run_main,
)


def main() -> int:
    ap = job_parser(__doc__)
    add_config_args(ap)
    ap.add_argument("--resume-from", default="", metavar="URI",
                    help="checkpoint to start from when the run has none of its own (local or s3://)")
    args = parse_args(ap)
    cfg = load_from_args(args)
    # why: after parsing: --help and argument errors load no torch or Ray
    from mama_ray.driver import run_pretrain
    from mama_ray.train.launch import check_data

    check_data(cfg)  # a wrong data.shards fails here, not after Ray started
    ensure_deepspeed_accelerator(cfg.scaling.use_gpu)  # reaches local workers; attached ones set it in train_func
    init_ray(num_cpus=max(MIN_TRAINING_CPUS, os.cpu_count() or 1))

    summary = run_pretrain(cfg, resume_from=args.resume_from)
    import ray  # why: as above

    ray.shutdown()  # flushes the workers' streamed logs, so the summary really is the last output
    if summary.eval_table:
        print(summary.eval_table)
    print("\n".join(summary.lines()))
    return 0


def cli() -> None:
    """Console-script entry point (``pyproject.toml`` [project.scripts])."""
    run_main(main)


if __name__ == "__main__":
    cli()
