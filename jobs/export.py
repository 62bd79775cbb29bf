r"""Export a (ZeRO-sharded) training checkpoint to a consolidated Hugging Face folder.

    mama-export --checkpoint ~/.cache/mama-ray/runs/mama-tiny --out /tmp/mama-export
    python jobs/export.py --checkpoint s3://bucket/runs/mama/checkpoint_00040000 \
        --out s3://bucket/models/mama [--metrics s3://bucket/eval/mama/metrics.json]
    python jobs/export.py --checkpoint s3://bucket/runs/mama --which best --out …   # a run's best checkpoint

The folder holds vision/ (transformers AutoModel), text/ + text_lora/ (peft adapter),
heads.safetensors, tokenizer/, mama_config.yaml and a model card (README.md) with the metrics of
--metrics, else of the evaluation of this checkpoint found in <checkpoint>/eval or <run>/eval.
"""

from __future__ import annotations

import importlib.util
import sys

if importlib.util.find_spec("mama_ray") is None:  # `python jobs/export.py` from a checkout without `pip install -e .`
    print("error: mama_ray is not installed; run `pip install -e .` in the checkout (README.md)", file=sys.stderr)
    sys.exit(2)  # the exit code of a usage error (mama_ray.runtime.EXIT_USAGE)

from mama_ray.layout import WHICH, resolve_checkpoint  # noqa: E402
from mama_ray.runtime import job_parser, parse_args, run_main  # noqa: E402


def main() -> int:
    ap = job_parser(__doc__)
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder (path or s3://)")
    ap.add_argument("--which", default="latest", choices=WHICH,
                    help="for a run folder: its newest checkpoint or the best by train.best_metric (<run>/best)")
    ap.add_argument("--out", required=True, help="output folder or s3:// prefix")
    ap.add_argument("--metrics", default=None, help="metrics.json to put in the model card")
    args = parse_args(ap)
    from mama_ray.export import export_checkpoint  # why: after parsing, so --help needs no torch

    files = export_checkpoint(resolve_checkpoint(args.checkpoint, args.which), args.out, args.metrics)
    print(f"exported {len(files)} files to {args.out}: " + ", ".join(f for f in files if "/" not in f))
    return 0


def cli() -> None:
    """Console-script entry point (``pyproject.toml`` [project.scripts])."""
    run_main(main)


if __name__ == "__main__":
    cli()
