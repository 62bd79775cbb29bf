"""Validation's share of a run, side by side with training, from a finished run's ``metrics.jsonl``.

    python bench/validation_cost.py <run folder> [<run folder without validation> …]

For each run: the validations (``val_seconds`` of the first — which decodes each rank's val share
— and the mean of the later ones), the training time (the sum over report windows of
``step_time_s × steps``; windows exclude validation, the loop restarts its timer after one) and
validation's share of the two. A run without validation shows training only, so a run with
``train.val_every: 0`` beside one with validation compares the training time of both.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from mama_ray.layout import read_metrics  # noqa: E402


def cost(run: str) -> dict[str, float]:
    """Training and validation seconds of one run's logged reports."""
    logged = read_metrics(run)
    if not logged:
        raise SystemExit(f"{run}: no metrics.jsonl")
    train_s, prev = 0.0, int(logged[0].get("start_step", 0))
    for m in logged:
        train_s += m["step_time_s"] * (int(m["step"]) - prev)
        prev = int(m["step"])
    val = [m["val_seconds"] for m in logged if "val_seconds" in m]
    later = val[1:]
    return {"steps": prev, "validations": len(val), "val_images": max(m.get("val_images", 0) for m in logged),
            "first_val_s": val[0] if val else 0.0, "later_val_s": sum(later) / len(later) if later else 0.0,
            "val_s": sum(val), "train_s": train_s, "share": sum(val) / (sum(val) + train_s)}


def main() -> int:
    runs = sys.argv[1:]
    if not runs:
        raise SystemExit(__doc__)
    print(f"{'run':<44}{'steps':>6}{'vals':>5}{'images':>7}{'1st val s':>10}{'later s':>9}"
          f"{'val s':>7}{'train s':>9}{'val share':>10}")
    for run in runs:
        c = cost(run)
        print(f"{run[-44:]:<44}{c['steps']:>6}{c['validations']:>5}{c['val_images']:>7.0f}{c['first_val_s']:>10.2f}"
              f"{c['later_val_s']:>9.2f}{c['val_s']:>7.1f}{c['train_s']:>9.1f}{100 * c['share']:>9.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
