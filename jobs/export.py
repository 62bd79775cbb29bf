"""Export a (ZeRO-sharded) training checkpoint to a consolidated Hugging Face folder.

    python jobs/export.py --checkpoint s3://bucket/runs/mama/checkpoint_00040000 \
        --out s3://bucket/models/mama [--metrics s3://bucket/eval/mama/metrics.json]

The folder holds vision/ (transformers AutoModel), text/ + text_lora/ (peft adapter),
heads.safetensors, tokenizer/, mama_config.yaml and a model card (README.md) with the metrics of
--metrics or of <checkpoint>/eval/metrics.json when an evaluation wrote one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from mama_ray.runtime import run_main  # noqa: E402


def main() -> int:
    from mama_ray.eval.export import export_checkpoint
    from mama_ray.eval.runner import resolve_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder (path or s3://)")
    ap.add_argument("--out", required=True, help="output folder or s3:// prefix")
    ap.add_argument("--metrics", default=None, help="metrics.json to put in the model card")
    args = ap.parse_args()
    files = export_checkpoint(resolve_checkpoint(args.checkpoint), args.out, args.metrics)
    print(f"exported {len(files)} files to {args.out}: " + ", ".join(f for f in files if "/" not in f))
    return 0


if __name__ == "__main__":
    run_main(main)
