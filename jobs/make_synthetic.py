"""Write an EMBED-like synthetic data set: DICOM MG files plus EMBED-named CSV tables.

    python jobs/make_synthetic.py --out /tmp/synthetic --studies 64 --seed 42
    python jobs/prepare_data.py --dicoms /tmp/synthetic/dicoms --tables /tmp/synthetic/tables --out /tmp/shards
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from mama_ray.runtime import run_main  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder or s3:// prefix (gets dicoms/ and tables/)")
    ap.add_argument("--studies", type=int, default=64, help="number of studies (4 images each)")
    ap.add_argument("--seed", type=int, default=42, help="everything follows from it")
    args = ap.parse_args()
    from mama_ray.data.synthetic import make_synthetic

    dicoms, tables = make_synthetic(args.out, args.studies, args.seed)
    print(f"dicoms: {dicoms}\ntables: {tables}")
    return 0


if __name__ == "__main__":
    run_main(main)
