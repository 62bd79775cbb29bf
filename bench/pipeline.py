"""Training-pipeline throughput: the Ray Data pipeline vs. a torch DataLoader, on the same shards.

    python bench/pipeline.py [--studies 48] [--image-size 518] [--cpus N] [--long-side 1024] [--epochs 1]
                             [--limits-refresh 0.1]

Writes ``--studies`` synthetic studies (4 mammogram-like images each, long side ``--long-side``,
PNG) as shards, then times ``--epochs`` training epochs back to back at ``--image-size``:

* **ray**: ``TrainStream.epoch`` (rank 0 of 1, epochs 1…E, each prefetching the next but the
  last) on a local Ray cluster of ``--cpus`` CPUs, after an untimed warm-up epoch 0 that starts
  the worker processes and their imports (its prefetch of epoch 1 is dropped, so the first
  timed epoch starts cold);
* **dataloader**: ``torch.utils.data.DataLoader(num_workers=--cpus, persistent_workers=True)``
  over an IterableDataset that reads the same shards with pyarrow (files dealt to workers) and
  runs the pipeline's own per-sample functions on them — the same decode, pairing, augmentation, caption
  and tokenisation code, without restoring the epoch's order.

Peak memory is the peak summed PSS of this process and all its descendants (Ray's raylet, GCS,
object store and workers; the DataLoader's workers), sampled every 0.25 s. CPU seconds are
those the same process tree spent in the timed part: unlike wall time they stay comparable on
a loaded machine. Prints one table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch.utils.data  # noqa: E402

from mama_ray.config import Config, load  # noqa: E402
from mama_ray.data import pipeline  # noqa: E402
from mama_ray.data import stream as data_stream  # noqa: E402
from mama_ray.data.schema import SHARD_SCHEMA  # noqa: E402
from mama_ray.data.shards import encode_image  # noqa: E402
from mama_ray.data.synthetic import synth_image  # noqa: E402
from mama_ray.storage import StorageOptions  # noqa: E402

STUDIES_PER_FILE = 16
NICENESS = "RAY_worker_niceness"  # Ray's setting for the nice value of its worker processes


def write_shards(root: Path, n_studies: int, long_side: int) -> None:
    """Synthetic studies (L/R × CC/MLO) resized to ``long_side`` and PNG-encoded, as shards."""
    rows = []
    for i in range(n_studies):
        rng = np.random.default_rng(i)
        images = []
        for k, (side, view) in enumerate((("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO"))):
            img = synth_image(rng, side, view, 1 + i % 4, "N")
            h, w = img.shape
            img = cv2.resize((img * 255).astype(np.uint8), (round(w * long_side / h), long_side),
                             interpolation=cv2.INTER_AREA)
            images.append({"image_id": f"{i}_{k}", "laterality": side, "view": view,
                           "image": encode_image(img), "codec": "png", "height": img.shape[0],
                           "width": img.shape[1], "density": 1 + i % 4, "birads": "N"})
        rows.append({"study_id": f"s{i}", "patient_id": f"p{i}", "split": "train",
                     "procedure": "MG Screening Bilateral", "reason": "screening", "age": 55,
                     "race": "White", "ethnicity": None, "images": images})
    root.mkdir(parents=True, exist_ok=True)
    for f, start in enumerate(range(0, n_studies, STUDIES_PER_FILE)):
        table = pa.Table.from_pylist(rows[start : start + STUDIES_PER_FILE], schema=SHARD_SCHEMA)
        pq.write_table(table, root / f"shard-{f:04d}.parquet", compression="zstd", row_group_size=4)


# Ray's per-node daemons (raylet, GCS, log monitor, agents): they run for Ray Train whichever
# loader feeds it, so the CPU table lists them apart from the pipeline's own work.
RAY_DAEMONS = ("raylet", "gcs_server", "log_monitor", "dashboard", "agent", "monitor.py", "runtime_env")


def _role(p: psutil.Process, me: psutil.Process) -> str:
    if p.pid == me.pid:
        return "driver"
    cmd = " ".join(p.cmdline()) or p.name()
    return "ray daemons" if any(d in cmd for d in RAY_DAEMONS) and "default_worker" not in cmd else "workers"


def tree_cpu_seconds() -> dict[str, float]:
    """User + system CPU seconds so far of this process ("driver") and its live descendants, by role."""
    me, total = psutil.Process(), {"driver": 0.0, "workers": 0.0, "ray daemons": 0.0}
    for p in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = p.cpu_times()
            total[_role(p, me)] += t.user + t.system
    return total


def cpu_since(before: dict[str, float]) -> dict[str, float]:
    """CPU seconds by role since ``before`` (a :func:`tree_cpu_seconds` reading), plus their "total"."""
    now = tree_cpu_seconds()
    spent = {k: now[k] - before[k] for k in now}
    return {**spent, "total": sum(spent.values())}


class PeakPss(threading.Thread):
    """Peak summed PSS of this process tree while running."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0, threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.wait(0.25):
            total = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):  # exited meanwhile
                    total += p.memory_full_info().pss
            self.peak = max(self.peak, total)

    def __enter__(self) -> PeakPss:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join()


def run_ray(cfg: Config, cpus: int, epochs: int) -> tuple[int, float, float, float, dict]:
    """(samples, seconds, peak bytes, data-wait seconds, CPU seconds by role) of ``epochs`` epochs through Ray."""
    import ray

    with PeakPss() as mem:
        temp = tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp")  # short: socket paths must fit 107 bytes
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
        ray.data.DataContext.get_current().enable_progress_bars = False
        stream = pipeline.TrainStream(cfg)
        # Warm up without a prefetch: a cancelled one's in-flight tasks would hold the CPUs for
        # seconds into the timed epoch.
        list(stream.epoch(0, prefetch_next=False))
        samples, wait, cpu, start = 0, 0.0, tree_cpu_seconds(), time.perf_counter()
        for epoch in range(1, epochs + 1):
            it = stream.epoch(epoch, prefetch_next=epoch < epochs)  # no wasted start of epoch E + 1
            samples += sum(len(b["image_id"]) for b in it)
            wait += it.wait_seconds
        seconds, cpu = time.perf_counter() - start, cpu_since(cpu)
        stream.close()
        ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
    return samples, seconds, mem.peak, wait, cpu


class ShardSamples(torch.utils.data.IterableDataset):
    """IterableDataset: each DataLoader worker maps its share of the shard files."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        index = pipeline.split_index(cfg, "train")
        ids = [sid for file_ids in index.study_ids for sid in file_ids]
        self.first = dict(zip(ids, index.flat.study_first.tolist(), strict=True))  # study → its first q
        self.fs, self.files = pipeline.shard_paths(cfg.data.shards, StorageOptions())

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for path in self.files[wid::nw]:
            with self.fs.open_input_file(path) as f:
                for rb in pq.ParquetFile(f).iter_batches(batch_size=4, columns=pipeline.READ_COLUMNS):
                    yield pipeline.train_columns(self.cfg, [
                        {**pipeline.train_sample(self.cfg, study, slot, 0, q), "sample_index": q,
                         "epoch_position": q, "sample_id": q}
                        for study in pa.Table.from_batches([rb]).to_pylist()
                        for slot in range(len(pipeline.usable_images(study)))
                        for q in [self.first[study["study_id"]] + slot]])


def run_dataloader(cfg: Config, cpus: int, epochs: int) -> tuple[int, float, float, dict]:
    """(samples, seconds, peak bytes, CPU seconds by role) of ``epochs`` epochs through a DataLoader."""
    pipeline.caption_tokens(cfg, ["warm-up"])  # import + build the tokenizer once; forked workers inherit it
    with PeakPss() as mem:
        loader = torch.utils.data.DataLoader(ShardSamples(cfg), batch_size=None, num_workers=cpus,
                                             prefetch_factor=2, persistent_workers=True)
        cpu, start = tree_cpu_seconds(), time.perf_counter()
        samples = sum(len(b["image_id"]) for _ in range(epochs) for b in loader)
        seconds, cpu = time.perf_counter() - start, cpu_since(cpu)  # workers still alive
    return samples, seconds, mem.peak, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=48)
    ap.add_argument("--image-size", type=int, default=518)
    ap.add_argument("--long-side", type=int, default=1024)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--limits-refresh", type=float, default=data_stream.LIMITS_REFRESH_S,
                    help="seconds between Ray Data's resource-limit refreshes (1 = Ray's own; see mama_ray/data/stream.py)")
    args = ap.parse_args()
    data_stream.LIMITS_REFRESH_S = args.limits_refresh
    os.environ.pop("RAY_ADDRESS", None)
    # Ray starts its workers at nice 15 (the DataLoader's run at 0): on a machine with any other
    # load that alone starves Ray's map tasks. Compare at equal priority unless told otherwise.
    os.environ.setdefault(NICENESS, "0")
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(Path(tmp) / "shards", args.studies, args.long_side)
        cfg = load("tiny_cpu", {"data.shards": str(Path(tmp) / "shards"), "data.image_size": args.image_size,
                                "train.micro_batch_size": 8, "data.map_batch_size": 16})
        r_n, r_s, r_mem, r_wait, r_cpu = run_ray(cfg, args.cpus, args.epochs)
        d_n, d_s, d_mem, d_cpu = run_dataloader(cfg, args.cpus, args.epochs)
    print(f"{args.studies} studies × 4 images, stored long side {args.long_side}, out {args.image_size}², "
          f"{args.cpus} CPUs; {args.epochs} epoch(s) ({r_n} pairs); load average {os.getloadavg()[0]:.1f}; "
          f"Ray worker niceness {os.environ[NICENESS]}; limits refresh {args.limits_refresh} s")
    print("| pipeline | pairs | s | pairs/s | CPU s | pairs/CPU-s | peak PSS MB | note |\n|---|---|---|---|---|---|---|---|")
    print(f"| Ray Data (TrainStream) | {r_n} | {r_s:.1f} | {r_n / r_s:.2f} | {r_cpu['total']:.1f} | "
          f"{r_n / r_cpu['total']:.1f} | {r_mem / 2**20:.0f} | data wait {r_wait:.1f} s |")
    print(f"| DataLoader ({args.cpus} workers) | {d_n} | {d_s:.1f} | {d_n / d_s:.2f} | {d_cpu['total']:.1f} | "
          f"{d_n / d_cpu['total']:.1f} | {d_mem / 2**20:.0f} | |")
    print(f"| ratio Ray / DataLoader | | | {(r_n / r_s) / (d_n / d_s):.2f} | | "
          f"{(r_n / r_cpu['total']) / (d_n / d_cpu['total']):.2f} | {r_mem / d_mem:.2f} | |")
    print("\nCPU seconds by process (the same timed part):\n\n| pipeline | driver | workers | Ray daemons | "
          "pairs/CPU-s without daemons |\n|---|---|---|---|---|")
    for name, n, cpu in (("Ray Data", r_n, r_cpu), ("DataLoader", d_n, d_cpu)):
        print(f"| {name} | {cpu['driver']:.2f} | {cpu['workers']:.2f} | {cpu['ray daemons']:.2f} | "
              f"{n / (cpu['total'] - cpu['ray daemons']):.1f} |")
    own = (r_n / (r_cpu["total"] - r_cpu["ray daemons"])) / (d_n / d_cpu["total"])
    print(f"| ratio Ray / DataLoader | | | | {own:.2f} |")

if __name__ == "__main__":
    main()
