"""Run one training epoch on its own small Ray cluster and print memory numbers as JSON.

Used by ``test_pipeline_memory.py`` in a subprocess (it needs its own object-store limit):
``python pipeline_memory_probe.py <work dir> <object store MB> <studies> [ranks on the node]``. Writes shards whose
encoded images (incompressible noise) add up to many times the object store, streams an epoch
through :func:`iter_train_batches` (its decoded samples are also more than the store), and
samples the object store and this process's RSS.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from mama_ray import config
from mama_ray.data import pipeline
from mama_ray.data.schema import SHARD_SCHEMA
from mama_ray.data.shards import encode_image

IMAGES_PER_STUDY, SIDE, STUDIES_PER_FILE = 4, 384, 25


def write_shards(root: Path, n_studies: int) -> int:
    """Shards of noise images (one encoded image reused: only the bytes matter here)."""
    root.mkdir(parents=True, exist_ok=True)
    data = encode_image(np.random.default_rng(0).integers(0, 256, (SIDE, SIDE)).astype(np.uint8))
    image = {"laterality": "L", "view": "CC", "image": data, "codec": "png", "height": SIDE,
             "width": SIDE, "density": 2, "birads": "N"}
    for f, start in enumerate(range(0, n_studies, STUDIES_PER_FILE)):
        rows = [{"study_id": f"s{i}", "patient_id": f"p{i}", "split": "train", "procedure": "MG Screening",
                 "reason": "screening", "age": 50, "race": "White", "ethnicity": None,
                 "images": [{**image, "image_id": f"s{i}_{k}"} for k in range(IMAGES_PER_STUDY)]}
                for i in range(start, min(n_studies, start + STUDIES_PER_FILE))]
        pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), root / f"shard-{f:04d}.parquet",
                       row_group_size=8, use_dictionary=False, compression="none")  # no dedup of the bytes
    return sum(p.stat().st_size for p in root.glob("*.parquet"))


class Sampler(threading.Thread):
    """Polls the object store (bytes used, primary copies) and this process's RSS every 50 ms; keeps the peaks."""

    def __init__(self):
        super().__init__(daemon=True)
        import ray
        from ray._private.internal_api import get_state_from_address

        self.state = get_state_from_address(ray.get_runtime_context().gcs_address)
        self.peak_store = self.peak_primary = self.peak_rss = self.spilled = self.created = 0
        self.stop = threading.Event()

    def sample(self) -> None:
        from ray._private.internal_api import get_memory_info_reply

        stats = get_memory_info_reply(self.state).store_stats
        self.peak_store = max(self.peak_store, stats.object_store_bytes_used)
        # Primary copies are what the raylet spills (above 80 % of the store); bytes used also count
        # objects already freed, which the raylet deletes in batches (about once a second).
        self.peak_primary = max(self.peak_primary, stats.object_store_bytes_primary_copy)
        self.spilled, self.created = stats.spilled_bytes_total, stats.cumulative_created_bytes
        self.peak_rss = max(self.peak_rss, psutil.Process().memory_info().rss)

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.sample()


def stream_epoch(cfg, ranks: int) -> int:
    """Epoch 0 of ``ranks`` ranks sharing this node, each consumed on its own thread; samples seen."""
    counts = [0] * ranks

    def run(rank: int) -> None:
        stream = pipeline.TrainStream(cfg, rank=rank, world_size=max(ranks, 4), local_ranks=ranks)
        counts[rank] = sum(len(b["image_id"]) for b in stream.epoch(0, drop_last=False))
        stream.close()  # the next epoch started when 3/4 of this one's samples were in

    threads = [threading.Thread(target=run, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts)


def main(work: Path, store_mb: int, n_studies: int, ranks: int) -> None:
    import ray
    import torch  # noqa: F401 - imported before the RSS baseline: the collate needs it anyway

    data_bytes = write_shards(work / "shards", n_studies)
    temp = tempfile.mkdtemp(prefix="ray-mem-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ray.init(address="local", num_cpus=max(2, ranks), object_store_memory=store_mb * 1024**2, include_dashboard=False,
             log_to_driver=False, _temp_dir=temp)
    # Output at the stored size: the decoded samples alone (≈ 190 MB) are ≈ 2.4× the store.
    cfg = config.load("tiny_cpu", {"data.shards": str(work / "shards"), "data.image_size": SIDE,
                                   "train.micro_batch_size": 16, "data.map_batch_size": 32, "data.block_mb": 8})
    sampler = Sampler()
    sampler.sample()
    rss_before = sampler.peak_rss
    sampler.start()
    # One rank: rank 0 of 4, which reads and decodes a quarter of the row groups. Several: ranks
    # 0..R-1 of R on this node, each its own execution.
    samples = stream_epoch(cfg, ranks)
    sampler.stop.set()
    sampler.join()
    sampler.sample()
    # Ray Data's iterator threads of the ranks may still be winding down; one that touches Ray
    # after ray.shutdown() ends the process with an error ("core worker has already been shutdown").
    deadline = time.monotonic() + 20
    for t in threading.enumerate():
        if t.name in ("Prefetcher", "iter_threaded"):
            t.join(max(0.0, deadline - time.monotonic()))
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
    print(json.dumps({"data_bytes": data_bytes, "store_limit": store_mb * 1024**2, "samples": samples,
                      "peak_store": sampler.peak_store,
                      "peak_primary": sampler.peak_primary, "spilled": sampler.spilled,
                      "created": sampler.created, "rss_before": rss_before, "peak_rss": sampler.peak_rss}))


if __name__ == "__main__":
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 1)
