"""Ingest throughput and the driver's cost: the Ray job vs. a plain single-process loop, same files.

    python bench/ingest.py [--images 2048] [--size 256] [--cpus 2] [--long-side 256] [--kinds uncompressed]

Writes ``--images`` synthetic MG DICOMs of ``size × 0.75·size`` pixels (4 per study, 14-bit) per
input kind — uncompressed (explicit VR little endian) and/or JPEG 2000 lossless — then times:

* the plain loop: dcmread → pixel_array → scale → crop → resize → PNG encode, one process;
* ``run_ingest`` (folder mode) on a local Ray cluster of ``--cpus`` CPUs, end to end (header scan,
  study tasks, shard tasks, manifest), after one untimed warm-up run that starts the workers.

Besides images/s it measures the **driver's CPU time** (``time.process_time`` of this process —
Ray's own driver threads included — over the timed run): seconds per image, and the images/s one
driver could sustain before it, not the workers, became the limit (1 / that). It prints one table
and the load average (the development machine is shared).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless  # noqa: E402

from mama_ray.config import load  # noqa: E402
from mama_ray.data.shards import encode_image  # noqa: E402
from mama_ray.data.synthetic import _dicom_bytes, _stored, synth_image  # noqa: E402
from mama_ray.dicom import PixelSettings, preprocess, read_dicom  # noqa: E402

KINDS = {"uncompressed": ExplicitVRLittleEndian, "jpeg2000": JPEG2000Lossless}
KEY_ENV = "BENCH_INGEST_PSEUDONYM_KEY"


def write_inputs(root: Path, n: int, size: int, syntax) -> list[Path]:
    """``n`` MG DICOMs (4 per study, 2 studies per patient), 14-bit, ``size`` rows."""
    files = []
    for i in range(n):
        rng = np.random.default_rng(i)
        side, view = "LR"[i % 2], ("CC", "MLO")[(i // 2) % 2]
        display = cv2.resize(synth_image(rng, side, view, 1 + i % 4, "N"), (size * 3 // 4, size))
        tags = dict(SOPInstanceUID=f"1.2.9.{i}", StudyInstanceUID=f"1.2.9.{i // 4}.0", PatientID=f"P{i // 8}",
                    ImageLaterality=side, ViewPosition=view, StudyDescription="MG Screening Bilateral",
                    Modality="MG")
        f = root / f"{i:05d}.dcm"
        f.write_bytes(_dicom_bytes(_stored(display, 14, False), 14, False, syntax, tags, False))
        files.append(f)
    return files


def plain_loop(files: list[Path], settings: PixelSettings) -> float:
    """Images/s of the single-process loop."""
    start = time.perf_counter()
    for f in files:
        raw, ds = read_dicom(str(f))
        encode_image(preprocess(raw, ds, settings))
    return len(files) / (time.perf_counter() - start)


def ray_job(folder: Path, out: Path, cfg) -> tuple[float, float]:
    """``(images/s, driver CPU seconds per image)`` of one ``run_ingest``."""
    from mama_ray.data.ingest import run_ingest

    start, cpu = time.perf_counter(), time.process_time()
    summary = run_ingest(str(folder), str(out), cfg, overwrite=True)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert summary.quarantined == 0, summary
    return summary.images / wall, cpu / summary.images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2048, help="images per input kind (4 per study)")
    ap.add_argument("--size", type=int, default=256, help="DICOM rows (columns = 0.75 × rows)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--long-side", type=int, default=256, help="ingest.long_side")
    ap.add_argument("--studies-per-shard", type=int, default=64, help="ingest.studies_per_shard")
    ap.add_argument("--kinds", nargs="+", default=["uncompressed"], choices=sorted(KINDS))
    args = ap.parse_args()
    import ray

    os.environ.setdefault(KEY_ENV, "bench key, not secret: 0123456789abcdef")
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    cfg = load("tiny_cpu", [f"ingest.long_side={args.long_side}", f"ingest.studies_per_shard={args.studies_per_shard}",
                            f"ingest.pseudonym_key=env:{KEY_ENV}"])
    settings = PixelSettings.from_config(cfg.ingest)
    print(f"{args.images} images of {args.size}×{args.size * 3 // 4} px, 14-bit → long side {args.long_side}; "
          f"{args.studies_per_shard} studies per shard; Ray cluster of {args.cpus} CPUs\n")
    print("| input | plain loop img/s (1 core) | Ray job img/s | job img/s per core | per core job/plain "
          "| driver CPU ms/image | driver ceiling img/s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds:
            folder = Path(tmp) / kind
            folder.mkdir()
            files = write_inputs(folder, args.images, args.size, KINDS[kind])
            plain = plain_loop(files, settings)
            ray_job(folder, Path(tmp) / "warm-up", cfg)  # untimed: starts the Ray workers
            job, driver = ray_job(folder, Path(tmp) / f"out-{kind}", cfg)
            per_core = job / args.cpus
            print(f"| {kind} | {plain:.1f} | {job:.1f} | {per_core:.1f} | {per_core / plain:.2f} "
                  f"| {driver * 1e3:.3f} | {1 / driver:,.0f} |")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\ndriver peak RSS {rss:.0f} MiB; load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    ray.shutdown()


if __name__ == "__main__":
    main()
