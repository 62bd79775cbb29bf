"""Ray Tune sweep: each trial a full distributed pretraining run, ASHA stops the weak ones early.

    mama-sweep                                            # tiny CPU sweep (tiny_tune preset, 3 trials)
    python tune/sweep.py --set tune.search=optuna         # the same from a checkout, Optuna's TPE
    mama-sweep --config base --space loss_weights --num-samples 16 [--set a.b=v]
    mama-sweep ... --resume                     # finish an interrupted sweep

Spaces are named in mama_ray/search_spaces.py. The run prints the table of trials and ends with the
path of the best trial's config (best_config.yaml), which jobs/pretrain.py --config accepts.
"""

from __future__ import annotations

import importlib.util
import sys

if importlib.util.find_spec("mama_ray") is None:  # `python tune/sweep.py` from a checkout without `pip install -e .`
    print("error: mama_ray is not installed; run `pip install -e .` in the checkout (README.md)", file=sys.stderr)
    sys.exit(2)  # the exit code of a usage error (mama_ray.runtime.EXIT_USAGE)

from mama_ray.config import add_config_args, load_from_args  # noqa: E402
from mama_ray.runtime import init_ray, job_parser, parse_args, run_main  # noqa: E402
from mama_ray.search_spaces import SPACES, get_space  # noqa: E402


def main() -> int:
    ap = job_parser(__doc__)
    add_config_args(ap, default="tiny_tune")
    ap.add_argument("--space", default=None, choices=sorted(SPACES), help="search space (default: tune.space)")
    ap.add_argument("--num-samples", type=int, default=None, help="trials (default: tune.num_samples)")
    ap.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this config")
    args = parse_args(ap)
    if args.space is not None:
        args.overrides.append(f"tune.space={args.space}")
    if args.num_samples is not None:
        args.overrides.append(f"tune.num_samples={args.num_samples}")
    cfg = load_from_args(args)
    space = get_space(cfg.tune.space)
    # why: after parsing: --help loads no torch
    from mama_ray.sweep import check_sweep, local_cpus, run_sweep

    check_sweep(cfg, space)  # a bad sweep fails before Ray starts

    init_ray(num_cpus=local_cpus(cfg))
    out = run_sweep(cfg, space, resume=args.resume)
    print(out.table, end="")
    print(f"best trial: {out.best_trial}; trials.csv, trials.md and best_config.yaml in {out.uri}")
    print(out.best_config)
    return 0


def cli() -> None:
    """Console-script entry point (``pyproject.toml`` [project.scripts])."""
    run_main(main)


if __name__ == "__main__":
    cli()
