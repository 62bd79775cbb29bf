"""What publishing the dashboard series costs: per micro-batch (data pipeline) and per report (loop).

    python bench/monitoring_overhead.py [--calls 20000]

In one local Ray driver (``ray.init``, so ``ray.util.metrics`` really records), times
``--calls`` calls of

* ``DataMonitor.batch`` — what ``TrainBatches`` adds to every micro-batch (3 series);
* ``publish_train`` of rank 0 with a full report (every loss term, both learning rates, scales,
  throughput, timings, a few ``val_*`` keys: 20 series) — what the loop adds per report;

against the same loop doing nothing, and prints µs per call beside a micro-batch and a report
interval of the default CPU run (docs/training.md: ≈ 0.66 s per step of 2 × 16 samples, so 0.33 s
per micro-batch and 6.6 s between reports at ``train.log_every: 10``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from mama_ray import monitoring  # noqa: E402

REPORT = {"loss": 5.5, "clip_loss": 5.0, "clip2_loss": 0.25, "mv_loss": 0.5, "sla_loss": 0.1,
          "data_wait_frac": 0.25, "samples_per_s": 40.0, "step_time_s": 0.8, "step": 12, "epoch": 1,
          "lr": 1e-3, "lr_late": 5e-4, "logit_scale": 14.3, "local_scale": 10.0, "memory_mb": 900.0,
          "start_step": 0, "val_loss": 6.0, "val_retrieval_r1": 0.125, "val_density_bacc": 0.5}
MICRO_BATCH_S, REPORT_S = 0.33, 6.6


def per_call_us(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for i in range(calls):
        fn(i)
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        data = monitoring.DataMonitor("bench", 0, 0)
        rows = [("nothing (loop only)", per_call_us(lambda i: None, args.calls), None),
                ("DataMonitor.batch", per_call_us(lambda i: data.batch(16, 0.001, i % 64), args.calls),
                 MICRO_BATCH_S),
                ("publish_train (rank 0)",
                 per_call_us(lambda i: monitoring.publish_train("bench", 0, 8, {**REPORT, "step": i}, 30.0),
                             max(1, args.calls // 10)), REPORT_S)]
    finally:
        ray.shutdown()
    print(f"| call | µs per call | share of its interval ({MICRO_BATCH_S} s micro-batch / {REPORT_S} s report) |")
    print("|---|---|---|")
    for name, us, interval in rows:
        share = f"{us / 1e6 / interval:.2e}" if interval else "—"
        print(f"| {name} | {us:.1f} | {share} |")


if __name__ == "__main__":
    main()
