"""Training-pipeline throughput: the Ray Data pipeline vs. a torch DataLoader, on the same shards.

    python bench/pipeline.py [--studies 48] [--image-size 518] [--cpus N] [--long-side 1024] [--rounds 3]
                             [--limits-refresh 0.1]

Writes ``--studies`` synthetic studies (4 mammogram-like images each, long side ``--long-side``,
PNG) as shards and starts three pipelines at ``--image-size``, each in a process of its own:

* **ray**: ``TrainStream.epoch`` (rank 0 of 1, the next epoch not prefetched) on a local Ray
  cluster of ``--cpus`` CPUs;
* **dataloader**: ``torch.utils.data.DataLoader(num_workers=--cpus, persistent_workers=True)``
  over an IterableDataset that reads the same shards with pyarrow (files dealt to workers) and
  runs the pipeline's own per-sample functions on them — the same decode, pairing, augmentation,
  caption and tokenisation code, without restoring the epoch's order;
* **dataloader + reuse**: the same with the base-view reuse the map tasks do (equal work).

Each runs an untimed warm-up epoch 0 (worker processes, imports), then ``--rounds`` rounds of one
timed epoch each, the pipelines taking turns (who goes first rotates), so that a machine whose
speed drifts — a shared VM — slows all of them alike within a round. Ratios are the median of the
rounds' ratios, with their range.

Peak memory is the peak summed PSS of a pipeline's process and all its descendants (Ray's raylet,
GCS, object store and workers; the DataLoader's workers), sampled every 0.25 s. CPU seconds are
those the same process tree spent in the timed epochs: unlike wall time they stay comparable on
a loaded machine. Prints one table.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import multiprocessing
import os
import shutil
import statistics
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
from mama_ray.data import pipeline, samples, transforms  # noqa: E402
from mama_ray.data import stream as data_stream  # noqa: E402
from mama_ray.data.schema import SHARD_SCHEMA  # noqa: E402
from mama_ray.data.shards import encode_image  # noqa: E402
from mama_ray.data.synthetic import synth_image  # noqa: E402
from mama_ray.storage import StorageOptions  # noqa: E402

STUDIES_PER_FILE = 16
NICENESS = "RAY_worker_niceness"  # Ray's setting for the nice value of its worker processes
LIMITS_ENV = "MAMA_BENCH_LIMITS_REFRESH_S"  # --limits-refresh, handed to the pipelines' processes


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


def start_ray(cpus: int) -> str:
    """A local Ray cluster of ``cpus`` CPUs for this process; returns its temp dir (to remove after)."""
    import ray

    temp = tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp")  # short: socket paths must fit 107 bytes
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    return temp


class RayPipeline:
    """Ray: a local cluster of ``cpus`` CPUs and one :class:`TrainStream` (rank 0 of 1), started
    once with an untimed warm-up epoch 0 (worker processes, imports)."""

    def __init__(self, cfg: Config, cpus: int):
        import ray

        self.temp = start_ray(cpus)
        ray.data.DataContext.get_current().enable_progress_bars = False
        self.stream = pipeline.TrainStream(cfg)
        self.epoch(0)

    def epoch(self, epoch: int) -> tuple[int, float]:
        """(samples, data-wait seconds) of one epoch; the next is not prefetched (it would run untimed)."""
        it = self.stream.epoch(epoch, prefetch_next=False)
        return sum(len(b["image_id"]) for b in it), it.wait_seconds

    def close(self) -> None:
        import ray

        self.stream.close()
        ray.shutdown()
        shutil.rmtree(self.temp, ignore_errors=True)


class ShardSamples(torch.utils.data.IterableDataset):
    """IterableDataset: each DataLoader worker maps its share of the shard files.

    Epochs 0, 1, … as the Ray run has them (each worker counts its own ``__iter__`` calls), so both
    do the same random draws. ``reuse``: one :class:`~mama_ray.data.samples.BaseViews` per study, the
    reuse the Ray pipeline's map tasks do per window (by default the plain per-sample function).
    """

    def __init__(self, cfg: Config, reuse: bool = False):
        super().__init__()
        self.cfg, self.reuse, self.epoch = cfg, reuse, -1  # the warm-up is epoch 0
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
        """This worker's samples of the next epoch, one dict per sample: the DataLoader stacks them
        into micro-batches (in the worker), as the stream's consumer stacks its rows."""
        self.epoch += 1
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for path in self.files[wid::nw]:
            with self.fs.open_input_file(path) as f:
                for rb in pq.ParquetFile(f).iter_batches(batch_size=4, columns=pipeline.READ_COLUMNS):
                    columns = pipeline.train_columns(self.cfg, [
                        s for study in pa.Table.from_batches([rb]).to_pylist() for s in self._samples(study)])
                    for i in range(len(columns["image_id"])):
                        yield {k: (v[i] if k in samples.STRING_KEYS else torch.from_numpy(np.asarray(v[i])))
                               for k, v in columns.items()}


class LoaderPipeline:
    """DataLoader: ``cpus`` persistent workers over :class:`ShardSamples`, started with an untimed
    warm-up epoch 0; between its timed epochs the workers wait on their queues (no CPU).

    ``in_ray_job``: then start a Ray cluster in this process after the workers (forked before
    Ray's threads exist), as a DataLoader inside a Ray Train worker has one: its daemons' CPU
    counts for this pipeline as Ray's counts for the stream's.
    """

    def __init__(self, cfg: Config, cpus: int, reuse: bool, in_ray_job: bool = True):
        pipeline.caption_tokens(cfg, ["warm-up"])  # import + build the tokenizer; forked workers inherit it
        self.loader = torch.utils.data.DataLoader(ShardSamples(cfg, reuse), batch_size=cfg.train.micro_batch_size,
                                                  num_workers=cpus, prefetch_factor=2, persistent_workers=True,
                                                  drop_last=True, worker_init_fn=_one_cv2_thread)
        self.epoch(0)
        self.temp = start_ray(cpus) if in_ray_job else None

    def epoch(self, epoch: int) -> tuple[int, None]:
        """(samples, None: no data-wait figure) of the next epoch (ShardSamples counts them itself)."""
        return sum(len(b["image_id"]) for b in self.loader), None

    def close(self) -> None:
        if self.temp is not None:
            import ray

            ray.shutdown()
            shutil.rmtree(self.temp, ignore_errors=True)


def _one_cv2_thread(_worker_id: int) -> None:
    """A DataLoader worker's OpenCV on one thread, as the map tasks run theirs (one CPU each)."""
    transforms.limit_threads(1)


PIPELINES = {"ray": RayPipeline, "dataloader": functools.partial(LoaderPipeline, reuse=False),
             "dataloader+reuse": functools.partial(LoaderPipeline, reuse=True),
             "dataloader+reuse, no Ray": functools.partial(LoaderPipeline, reuse=True, in_ray_job=False)}


def serve(conn, kind: str, cfg: Config, cpus: int) -> None:
    """A pipeline's own process: one timed epoch per epoch number received, until None.

    Each pipeline runs in a process of its own so that the CPU seconds of its tree are its own;
    the rounds alternate between the processes, so a machine whose speed drifts (a shared VM)
    slows every pipeline alike within a round.
    """
    os.environ.pop("RAY_ADDRESS", None)
    data_stream.LIMITS_REFRESH_S = float(os.environ[LIMITS_ENV])
    pipe = PIPELINES[kind](cfg, cpus)
    conn.send("ready")
    while (epoch := conn.recv()) is not None:
        with PeakPss() as mem:
            cpu, sampled, start = tree_cpu_seconds(), mem.cpu_seconds, time.perf_counter()
            n, wait = pipe.epoch(epoch)
            seconds, cpu = time.perf_counter() - start, cpu_since(cpu, mem, sampled)
        conn.send((n, seconds, mem.peak, wait, cpu))
    pipe.close()


class Pipeline:
    """Handle on a :func:`serve` process."""

    def __init__(self, kind: str, cfg: Config, cpus: int):
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no Ray or torch state inherited
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child, kind, cfg, cpus), daemon=False)
        self.proc.start()
        if self.conn.recv() != "ready":
            raise RuntimeError(f"{kind} did not start")

    def epoch(self, epoch: int) -> tuple:
        self.conn.send(epoch)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=48)
    ap.add_argument("--image-size", type=int, default=518)
    ap.add_argument("--long-side", type=int, default=1024)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--rounds", type=int, default=8, help="timed epochs of each pipeline, alternating")
    ap.add_argument("--limits-refresh", type=float, default=data_stream.LIMITS_REFRESH_S,
                    help="seconds between Ray Data's resource-limit refreshes until an execution has its limits "
                         "(1 = Ray's own; see mama_ray/data/stream.py)")
    args = ap.parse_args()
    # Ray starts its workers at nice 15 (the DataLoader's run at 0): on a machine with any other
    # load that alone starves Ray's map tasks. Compare at equal priority unless told otherwise.
    os.environ.setdefault(NICENESS, "0")
    os.environ[LIMITS_ENV] = str(args.limits_refresh)  # read by the spawned processes
    names = {"ray": "Ray Data (TrainStream)", "dataloader": f"DataLoader ({args.cpus} workers), in a Ray job",
             "dataloader+reuse": "DataLoader + per-study view reuse, in a Ray job",
             "dataloader+reuse, no Ray": "DataLoader + per-study view reuse, no Ray in its process"}
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(Path(tmp) / "shards", args.studies, args.long_side)
        cfg = load("tiny_cpu", {"data.shards": str(Path(tmp) / "shards"), "data.image_size": args.image_size,
                                "train.micro_batch_size": 8, "data.map_batch_size": 16})
        procs = {kind: Pipeline(kind, cfg, args.cpus) for kind in names}
        runs: dict[str, list[tuple]] = {kind: [] for kind in names}
        for r in range(1, args.rounds + 1):
            kinds = list(names)
            for kind in kinds[r % len(kinds):] + kinds[: r % len(kinds)]:  # who goes first rotates
                runs[kind].append(procs[kind].epoch(r))
        for proc in procs.values():
            proc.close()
    print(f"{args.studies} studies × 4 images, stored long side {args.long_side}, out {args.image_size}², "
          f"{args.cpus} CPUs; {args.rounds} round(s) of one epoch each; load average {os.getloadavg()[0]:.1f}; "
          f"Ray worker niceness {os.environ[NICENESS]}; limits refresh {args.limits_refresh} s")
    print(table({names[k]: v for k, v in runs.items()}))


def _ratios(ray: list[tuple], other: list[tuple], rate) -> str:
    """Ray's rate ÷ the other's: median of the rounds' ratios (their range when several)."""
    per_round = sorted(rate(a) / rate(b) for a, b in zip(ray, other, strict=True))
    text = f"{statistics.median(per_round):.2f}"
    return text + (f" ({per_round[0]:.2f}–{per_round[-1]:.2f})" if len(per_round) > 1 else "")


def table(runs: dict[str, list[tuple]]) -> str:
    """Markdown: one row per pipeline (its rounds summed) and Ray's ratios to it, round by round."""
    ray = next(iter(runs.values()))
    lines = ["| pipeline | pairs | s | pairs/s | CPU s: driver / workers / Ray Data actors / Ray daemons | "
             "pairs/CPU-s | Ray ÷ it, pairs/s | Ray ÷ it, pairs/CPU-s | Ray ÷ it, peak PSS | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rounds in runs.items():
        n, secs, mem = sum(r[0] for r in rounds), sum(r[1] for r in rounds), max(r[2] for r in rounds)
        cpu = {k: sum(r[4][k] for r in rounds) for k in (*ROLES, "total")}
        split = " / ".join(f"{cpu[r]:.2f}" for r in ROLES)
        ray_mem = max(r[2] for r in ray)
        ratios = (f"{_ratios(ray, rounds, lambda r: r[0] / r[1])} | {_ratios(ray, rounds, lambda r: r[0] / r[4]['total'])}"
                  f" | {ray_mem / mem:.2f}")
        waits = [r[3] for r in rounds if r[3] is not None]
        note = (f"data wait {sum(waits):.1f} s, " if waits else "") + f"peak PSS {mem / 2**20:.0f} MB"
        lines.append(f"| {name} | {n} | {secs:.1f} | {n / secs:.1f} | {split} | {n / cpu['total']:.1f} | {ratios} | {note} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
