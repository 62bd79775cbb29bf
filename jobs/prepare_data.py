r"""Ingest DICOMs (optionally guided by EMBED tables) into training shards, on Ray.

    mama-prepare-data --dicoms /tmp/synthetic/dicoms --tables /tmp/synthetic/tables --out /tmp/shards
    python jobs/prepare_data.py --dicoms s3://bucket/dicoms --out s3://bucket/shards \
        --set ingest.pseudonym_key=/secure/pseudonym.key [--tables s3://bucket/tables] \
        [--overwrite] [--config base] [--set ingest.long_side=1024]

Ids and stored paths are HMAC pseudonyms under the key ``ingest.pseudonym_key`` names (env:NAME,
a key file or an s3:// URI); keep the key: the same key gives the same ids on every run.
Re-running with the same arguments finishes an interrupted ingest (finished shards are kept).
"""

from __future__ import annotations

import importlib.util
import sys

if importlib.util.find_spec("mama_ray") is None:  # `python jobs/prepare_data.py` from a checkout without `pip install -e .`
    print("error: mama_ray is not installed; run `pip install -e .` in the checkout (README.md)", file=sys.stderr)
    sys.exit(2)  # the exit code of a usage error (mama_ray.runtime.EXIT_USAGE)

from mama_ray.config import add_config_args, load_from_args  # noqa: E402
from mama_ray.runtime import init_ray, job_parser, parse_args, run_main  # noqa: E402
from mama_ray.storage import StorageOptions  # noqa: E402


def main() -> int:
    ap = job_parser(__doc__)
    ap.add_argument("--dicoms", required=True, help="folder or s3:// prefix of the DICOM files")
    ap.add_argument("--out", required=True, help="folder or s3:// prefix for the shards")
    ap.add_argument("--tables", default=None, help="folder or s3:// prefix of EMBED-style tables")
    ap.add_argument("--overwrite", action="store_true", help="delete what --out holds and redo it")
    add_config_args(ap)
    args = parse_args(ap)
    cfg = load_from_args(args)
    # why: after parsing: --help loads no Ray
    from mama_ray.data.ingest import pseudonym_key, run_ingest

    pseudonym_key(cfg, StorageOptions.from_config(cfg.storage))  # no key: fail before Ray starts
    init_ray()
    s = run_ingest(args.dicoms, args.out, cfg, tables=args.tables, overwrite=args.overwrite)
    print(f"ingested {s.images} images in {s.studies} studies → {s.shards} shards at {s.out} "
          f"({s.skipped_shards} already done); quarantined {s.quarantined} of {s.inputs} inputs "
          f"(see quarantine.parquet); pseudonym key id {s.key_id}")
    return 0


def cli() -> None:
    """Console-script entry point (``pyproject.toml`` [project.scripts])."""
    run_main(main)


if __name__ == "__main__":
    cli()
