"""``python -m mama_ray.models --preset base [--json]``: parameter counts per part.

Built on the meta device (no memory, no weights read), so the 2.7B-parameter base LLM is free.
"""

from __future__ import annotations

import argparse
import json

from mama_ray import config
from mama_ray.models.params import BIOMEDLM_VOCAB, count_parameters, format_param_table


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Total and trainable parameters of a MaMA model, per part.")
    ap.add_argument("--preset", default="tiny", choices=sorted(config.MODEL_PRESETS))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=v",
                    help="override a config field, e.g. --set model.lora.r=16")
    ap.add_argument("--vocab-size", type=int, default=None,
                    help=f"text embedding rows; default {BIOMEDLM_VOCAB} (BioMedLM) for base, else the tiny tokenizer's")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = ap.parse_args(argv)
    try:
        cfg = config.override(config.from_dict({"model": {"preset": a.preset}}), a.overrides)
    except config.ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    vocab = a.vocab_size or (BIOMEDLM_VOCAB if a.preset == "base" else None)
    counts = count_parameters(cfg, vocab_size=vocab)
    print(json.dumps(counts) if a.json else format_param_table(counts))


if __name__ == "__main__":
    main()
