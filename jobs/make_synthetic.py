"""Write an EMBED-like synthetic data set: DICOM MG files plus EMBED-named CSV tables.

    mama-make-synthetic --out /tmp/synthetic --studies 64 --seed 42
    python jobs/make_synthetic.py --out s3://bucket/synthetic --studies 1000   # from a checkout
    mama-prepare-data --dicoms /tmp/synthetic/dicoms --tables /tmp/synthetic/tables --out /tmp/shards \
        --set ingest.pseudonym_key=~/.mama-ray-pseudonym.key   # a key file you made (docs/ingest.md)
"""

from __future__ import annotations

import importlib.util
import sys

if importlib.util.find_spec("mama_ray") is None:  # `python jobs/make_synthetic.py` from a checkout without `pip install -e .`
    print("error: mama_ray is not installed; run `pip install -e .` in the checkout (README.md)", file=sys.stderr)
    sys.exit(2)  # the exit code of a usage error (mama_ray.runtime.EXIT_USAGE)

from mama_ray.runtime import job_parser, parse_args, run_main  # noqa: E402


def main() -> int:
    ap = job_parser(__doc__)
    ap.add_argument("--out", required=True, help="folder or s3:// prefix (gets dicoms/ and tables/)")
    ap.add_argument("--studies", type=int, default=64, help="number of studies (4 images each)")
    ap.add_argument("--seed", type=int, default=42, help="everything follows from it")
    args = parse_args(ap)
    # why: after parsing, so --help loads no data code
    from mama_ray.data.synthetic import make_synthetic

    dicoms, tables = make_synthetic(args.out, args.studies, args.seed)
    print(f"dicoms: {dicoms}\ntables: {tables}")
    return 0


def cli() -> None:
    """Console-script entry point (``pyproject.toml`` [project.scripts])."""
    run_main(main)


if __name__ == "__main__":
    cli()
