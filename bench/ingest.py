"""Ingest throughput: the Ray Data job vs. a plain single-process loop, on the same files.

    python bench/ingest.py [--images 32] [--size 2048] [--cpus 2] [--long-side 1024]

Writes ``--images`` synthetic MG DICOMs of ``size × 0.75·size`` pixels twice — uncompressed
(explicit VR little endian) and JPEG 2000 lossless — then times, for each input kind:

* the plain loop: dcmread → pixel_array → scale → crop → resize → PNG encode, one process;
* ``run_ingest`` (folder mode) on a local Ray cluster of ``--cpus`` CPUs, end to end (header scan,
  one task per study, shard writing, manifest), after one untimed warm-up run that starts the
  workers.

It prints one table: images/s of each, the job's images/s per core, and the ratios.
"""

from __future__ import annotations

import argparse
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

KINDS = {"uncompressed": ExplicitVRLittleEndian, "JPEG 2000": JPEG2000Lossless}


def write_inputs(root: Path, n: int, size: int, syntax) -> list[Path]:
    """``n`` MG DICOMs (4 per study), 14-bit, large enough for decode cost to matter."""
    files = []
    for i in range(n):
        rng = np.random.default_rng(i)
        side, view = "LR"[i % 2], ("CC", "MLO")[(i // 2) % 2]
        display = cv2.resize(synth_image(rng, side, view, 1 + i % 4, "N"), (size * 3 // 4, size))
        tags = dict(SOPInstanceUID=f"1.2.9.{i}", StudyInstanceUID=f"1.2.9.{i // 4}.0", PatientID=f"P{i // 8}",
                    ImageLaterality=side, ViewPosition=view, StudyDescription="MG Screening Bilateral")
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


def ray_job(folder: Path, out: Path, cfg) -> float:
    from mama_ray.data.ingest import run_ingest

    start = time.perf_counter()
    summary = run_ingest(str(folder), str(out), cfg, overwrite=True)
    assert summary.quarantined == 0, summary
    return summary.images / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32, help="images per input kind (4 per study)")
    ap.add_argument("--size", type=int, default=2048, help="DICOM rows (columns = 0.75 × rows)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--long-side", type=int, default=1024, help="ingest.long_side")
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    cfg = load("tiny_cpu", [f"ingest.long_side={args.long_side}", "ingest.studies_per_shard=4"])
    settings = PixelSettings.from_config(cfg.ingest)
    print(f"{args.images} images of {args.size}×{args.size * 3 // 4} px, 14-bit → long side "
          f"{args.long_side}; Ray cluster of {args.cpus} CPUs\n")
    print("| input | plain loop img/s (1 core) | Ray job img/s | Ray job img/s per core | job/plain | per core job/plain |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind, syntax in KINDS.items():
            folder = Path(tmp) / kind.replace(" ", "")
            folder.mkdir()
            files = write_inputs(folder, args.images, args.size, syntax)
            plain = plain_loop(files, settings)
            ray_job(folder, Path(tmp) / "warm-up", cfg)  # untimed: starts the Ray workers
            job = ray_job(folder, Path(tmp) / f"out-{folder.name}", cfg)
            per_core = job / args.cpus
            print(f"| {kind} | {plain:.2f} | {job:.2f} | {per_core:.2f} | {job / plain:.2f} | {per_core / plain:.2f} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
