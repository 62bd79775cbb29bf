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
from mama_ray.data import pipeline, samples  # noqa: E402
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


# Ray's per-node daemons (raylet, GCS, log monitor, agents) run for Ray Train whichever loader
# feeds it; Ray Data's helper actors (stats, autoscaling coordinator) run for Ray Data only. The
# CPU table lists both apart from the workers that do the per-sample work.
RAY_DAEMONS = ("raylet", "gcs_server", "log_monitor", "Agent", "dashboard", "monitor.py")
ROLES = ("driver", "workers", "Ray Data actors", "Ray daemons")


def _role(p: psutil.Process, me: psutil.Process) -> str:
    if p.pid == me.pid:
        return "driver"
    cmd = " ".join(p.cmdline()) or p.name()
    if cmd.startswith("ray::_"):  # Ray Data's own actors: ray::_StatsActor, ray::_AutoscalingCoordinatorActor
        return "Ray Data actors"
    return "Ray daemons" if any(d in cmd for d in RAY_DAEMONS) else "workers"


def tree_cpu_seconds() -> dict[str, float]:
    """User + system CPU seconds so far of this process ("driver") and its live descendants, by role."""
    me, total = psutil.Process(), dict.fromkeys(ROLES, 0.0)
    for p in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = p.cpu_times()
            total[_role(p, me)] += t.user + t.system
    return total


def cpu_since(before: dict[str, float], sampler: PeakPss, sampler_before: float) -> dict[str, float]:
    """CPU seconds by role since ``before`` (a :func:`tree_cpu_seconds` reading), plus their "total".

    The memory sampler's CPU since ``sampler_before`` is taken off the driver's: it measures, it
    is not part of either pipeline.
    """
    now = tree_cpu_seconds()
    spent = {k: now[k] - before[k] for k in now}
    spent["driver"] -= sampler.cpu_seconds - sampler_before
    return {**spent, "total": sum(spent.values())}


class PeakPss(threading.Thread):
    """Peak summed PSS of this process tree while running.

    Reading a process's PSS makes the kernel walk its page tables (in this process's system time),
    and Ray's tree has more processes with more mapped memory (the object store), so the sampler
    counts its own CPU (``cpu_seconds``) for the timed part to leave it out.
    """

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop, self.cpu_seconds = 0, threading.Event(), 0.0

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.wait(0.25):
            total = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):  # exited meanwhile
                    total += p.memory_full_info().pss
            self.peak = max(self.peak, total)
            self.cpu_seconds = time.thread_time()  # this thread's user + system CPU so far

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
        samples, wait, start = 0, 0.0, time.perf_counter()
        cpu, sampled = tree_cpu_seconds(), mem.cpu_seconds
        for epoch in range(1, epochs + 1):
            it = stream.epoch(epoch, prefetch_next=epoch < epochs)  # no wasted start of epoch E + 1
            samples += sum(len(b["image_id"]) for b in it)
            wait += it.wait_seconds
        seconds, cpu = time.perf_counter() - start, cpu_since(cpu, mem, sampled)
        stream.close()
        ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
    return samples, seconds, mem.peak, wait, cpu


class ShardSamples(torch.utils.data.IterableDataset):
    """IterableDataset: each DataLoader worker maps its share of the shard files.

    Epochs 1, 2, … as the Ray run has them (each worker counts its own ``__iter__`` calls), so both
    do the same random draws. ``reuse``: one :class:`~mama_ray.data.samples.BaseViews` per study, the
    reuse the Ray pipeline's map tasks do per window (by default the plain per-sample function).
    """

    def __init__(self, cfg: Config, reuse: bool = False):
        super().__init__()
        self.cfg, self.reuse, self.epoch = cfg, reuse, 0
        index = pipeline.split_index(cfg, "train")
        ids = [sid for file_ids in index.study_ids for sid in file_ids]
        self.first = dict(zip(ids, index.flat.study_first.tolist(), strict=True))  # study → its first q
        self.fs, self.files = pipeline.shard_paths(cfg.data.shards, StorageOptions())

    def _samples(self, study: dict) -> list[dict]:
        views = samples.BaseViews(self.cfg.data.image_size, self.cfg.data.view_cache_mb * 2**20 if self.reuse else 0)
        out = []
        for slot in range(len(pipeline.usable_images(study))):
            q = self.first[study["study_id"]] + slot
            out.append({**pipeline.train_sample(self.cfg, study, slot, self.epoch, q, views),
                        "sample_index": q, "epoch_position": q, "sample_id": q})
        return out

    def __iter__(self):
        self.epoch += 1
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for path in self.files[wid::nw]:
            with self.fs.open_input_file(path) as f:
                for rb in pq.ParquetFile(f).iter_batches(batch_size=4, columns=pipeline.READ_COLUMNS):
                    yield pipeline.train_columns(self.cfg, [
                        s for study in pa.Table.from_batches([rb]).to_pylist() for s in self._samples(study)])


def run_dataloader(cfg: Config, cpus: int, epochs: int, reuse: bool = False) -> tuple[int, float, float, None, dict]:
    """(samples, seconds, peak bytes, None (no data-wait figure), CPU seconds by role) of ``epochs`` epochs through a DataLoader."""
    pipeline.caption_tokens(cfg, ["warm-up"])  # import + build the tokenizer once; forked workers inherit it
    with PeakPss() as mem:
        loader = torch.utils.data.DataLoader(ShardSamples(cfg, reuse), batch_size=None, num_workers=cpus,
                                             prefetch_factor=2, persistent_workers=True)
        cpu, sampled, start = tree_cpu_seconds(), mem.cpu_seconds, time.perf_counter()
        samples = sum(len(b["image_id"]) for _ in range(epochs) for b in loader)
        seconds, cpu = time.perf_counter() - start, cpu_since(cpu, mem, sampled)  # workers still alive
    return samples, seconds, mem.peak, None, cpu


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
        runs = {"Ray Data (TrainStream)": run_ray(cfg, args.cpus, args.epochs),
                f"DataLoader ({args.cpus} workers)": run_dataloader(cfg, args.cpus, args.epochs),
                "DataLoader + per-study view reuse": run_dataloader(cfg, args.cpus, args.epochs, reuse=True)}
    print(f"{args.studies} studies × 4 images, stored long side {args.long_side}, out {args.image_size}², "
          f"{args.cpus} CPUs; {args.epochs} epoch(s); load average {os.getloadavg()[0]:.1f}; "
          f"Ray worker niceness {os.environ[NICENESS]}; limits refresh {args.limits_refresh} s")
    print(table(runs))


def table(runs: dict[str, tuple]) -> str:
    """Markdown: one row per run (pairs, wall, CPU by process, memory) and each run's ratios to the first."""
    ray_n, ray_s, ray_mem, _, ray_cpu = next(iter(runs.values()))
    lines = ["| pipeline | pairs | s | pairs/s | CPU s: driver / workers / Ray Data actors / Ray daemons | "
             "pairs/CPU-s | Ray ÷ it, pairs/s | Ray ÷ it, pairs/CPU-s | Ray ÷ it, peak PSS | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, (n, secs, mem, wait, cpu) in runs.items():
        split = " / ".join(f"{cpu[r]:.2f}" for r in ROLES)
        ratios = f"{(ray_n / ray_s) / (n / secs):.2f} | {(ray_n / ray_cpu['total']) / (n / cpu['total']):.2f} | " \
                 f"{ray_mem / mem:.2f}"
        note = f"data wait {wait:.1f} s, peak PSS {mem / 2**20:.0f} MB" if wait is not None else f"peak PSS {mem / 2**20:.0f} MB"
        lines.append(f"| {name} | {n} | {secs:.1f} | {n / secs:.1f} | {split} | {n / cpu['total']:.1f} | {ratios} | {note} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
