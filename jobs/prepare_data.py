"""Ingest DICOMs (optionally guided by EMBED tables) into training shards, on Ray Data.

    python jobs/prepare_data.py --dicoms s3://bucket/dicoms --out s3://bucket/shards \
        [--tables s3://bucket/tables] [--overwrite] [--config base] [--set ingest.long_side=1024]

Re-running with the same arguments finishes an interrupted ingest (finished shards are kept).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from mama_ray.config import add_config_args, load_from_args  # noqa: E402
from mama_ray.runtime import init_ray, run_main  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dicoms", required=True, help="folder or s3:// prefix of the DICOM files")
    ap.add_argument("--out", required=True, help="folder or s3:// prefix for the shards")
    ap.add_argument("--tables", default=None, help="folder or s3:// prefix of EMBED-style tables")
    ap.add_argument("--overwrite", action="store_true", help="delete what --out holds and redo it")
    add_config_args(ap)
    args = ap.parse_args()
    cfg = load_from_args(args)
    init_ray()
    from mama_ray.data.ingest import run_ingest

    s = run_ingest(args.dicoms, args.out, cfg, tables=args.tables, overwrite=args.overwrite)
    print(f"ingested {s.images} images in {s.studies} studies → {s.shards} shards at {s.out} "
          f"({s.skipped_shards} already done); quarantined {s.quarantined} of {s.inputs} inputs "
          f"(see quarantine.parquet)")
    return 0


if __name__ == "__main__":
    run_main(main)
