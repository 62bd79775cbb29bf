r"""Evaluate a MaMA checkpoint: zero-shot, linear probe, fine-tuning, retrieval, attention maps.

    mama-evaluate --checkpoint ~/.cache/mama-ray/runs/mama-tiny     # newest checkpoint of a run
    python jobs/evaluate.py --checkpoint s3://bucket/runs/mama/checkpoint_00040000 \
        [--tasks zero_shot,probe,retrieval,attention] [--out s3://bucket/eval/mama] \
        [--config base] [--set eval.balanced_test=true]

--checkpoint may also name a run folder: its newest checkpoint, or with --which best the best one
by train.best_metric (<run>/best). Without --config the
run's own config (saved in the checkpoint) is used; --set overrides either. Results:
metrics.json + PNGs under --out (default: <checkpoint>/eval). Tasks: zero_shot, probe,
finetune, retrieval, attention.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

if importlib.util.find_spec("mama_ray") is None:  # `python jobs/evaluate.py` from a checkout without `pip install -e .`
    print("error: mama_ray is not installed; run `pip install -e .` in the checkout (README.md)", file=sys.stderr)
    sys.exit(2)  # the exit code of a usage error (mama_ray.runtime.EXIT_USAGE)

from mama_ray.eval import DEFAULT_TASKS, evaluate, zero_shot_table  # noqa: E402
from mama_ray.eval.runner import check_tasks  # noqa: E402
from mama_ray.layout import WHICH, checkpoint_config, resolve_checkpoint  # noqa: E402
from mama_ray.runtime import init_ray, job_parser, parse_args, run_main  # noqa: E402


def main() -> int:
    ap = job_parser(__doc__)
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder (path or s3://)")
    ap.add_argument("--which", default="latest", choices=WHICH,
                    help="for a run folder: its newest checkpoint or the best by train.best_metric (<run>/best)")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS), type=_tasks, help="comma-separated evaluation tasks")
    ap.add_argument("--out", default=None, help="output folder or s3:// prefix (default <checkpoint>/eval)")
    ap.add_argument("--config", default=None, help="preset or YAML (default: the checkpoint's own config)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=v",
                    help="override a config field (repeatable)")
    args = parse_args(ap)
    checkpoint = resolve_checkpoint(args.checkpoint, args.which)
    cfg = checkpoint_config(checkpoint, args.config, args.overrides)
    init_ray()
    metrics = evaluate(cfg, checkpoint, args.tasks, args.out)
    if "zero_shot" in metrics:
        print(zero_shot_table(metrics["zero_shot"]))
    for key in ("linear_probe", "finetune", "retrieval"):
        if key in metrics:
            print(f"{key}: {json.dumps(_short(metrics[key]))}")
    print(f"wrote metrics.json and {len(metrics['files'])} files to {args.out or checkpoint + '/eval'}")
    return 0


def _tasks(text: str) -> list[str]:
    try:
        return check_tasks([t.strip() for t in text.split(",") if t.strip()])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _short(m: dict) -> dict:
    """Headline numbers only: balanced accuracy per task/fraction, or recall@K."""
    if "image_to_text" in m:
        return {k: m[k] for k in ("image_to_text", "text_to_image")}
    return {task: {f: round(r["balanced_accuracy"], 4) for f, r in by_f.items()} for task, by_f in m.items()}


def cli() -> None:
    """Console-script entry point (``pyproject.toml`` [project.scripts])."""
    run_main(main)


if __name__ == "__main__":
    cli()
