"""Shared test fixtures: one local Ray cluster per session and a real HTTP S3 server (moto).

Ray is started once (oversubscribed logical CPUs so a 2-core machine can host several workers)
and every Ray worker inherits the S3 endpoint and fake credentials through the runtime env, so
code under test talks to moto over real HTTP exactly as it would talk to AWS. ``write_shards``
writes small synthetic shards in the shard schema (docs/architecture.md) with known contents:
which images are usable (complete caption), which study each belongs to, and which split.
Tests that need their own cluster layout (several nodes, a `ray start --head`) run it in a
subprocess so they never fight this session's cluster.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mama_ray.data.schema import SHARD_SCHEMA
from mama_ray.data.shards import encode_image

RAY_CPUS = 6  # logical CPUs of the session cluster (oversubscribed on purpose)
# The session cluster has no dashboard, so no state API for Train's run tracking; set before any
# test builds a trainer (build_trainer turns tracking on where the variable is unset).
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on 127.0.0.1:<free port>; yields its endpoint URL.

    The endpoint and dummy credentials are exported so boto3, pyarrow and Ray workers all use it.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the moto server; yields ``(endpoint, bucket)``."""
    from mama_ray.storage import s3_client

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=bucket)
    yield s3_server, bucket


@pytest.fixture(scope="session")
def ray_session(s3_server, tmp_path_factory):
    """One local Ray cluster for the whole test session (workers see the S3 fixture's env)."""
    import ray

    env_vars = {k: os.environ[k] for k in os.environ if k.startswith("AWS_")}
    env_vars["DS_ACCELERATOR"] = "cpu"
    os.environ["DS_ACCELERATOR"] = "cpu"
    ray.init(
        num_cpus=RAY_CPUS,
        object_store_memory=512 * 1024**2,
        include_dashboard=False,
        runtime_env={"env_vars": env_vars},
        _temp_dir=str(Path("/tmp") / f"ray-test-{uuid.uuid4().hex[:6]}"),
        log_to_driver=False,
        ignore_reinit_error=True,
    )
    yield ray
    ray.shutdown()


SPLIT_OF = ("train",) * 7 + ("val", "test", "test")  # study i → SPLIT_OF[i % 10]


def blob_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A dark background with a bright noisy ellipse (a breast-like foreground for Otsu)."""
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx = height / 2 + rng.uniform(-3, 3), width * rng.uniform(0.3, 0.5)
    inside = ((yy - cy) / (0.4 * height)) ** 2 + ((xx - cx) / (0.3 * width)) ** 2 < 1
    img = rng.integers(0, 20, (height, width))
    img[inside] = rng.integers(120, 255, int(inside.sum()))
    return img.astype(np.uint8)


def make_study(rng: np.random.Generator, i: int, side: int) -> dict:
    """Study ``i``: 1–4 usable images, plus an incomplete one (no BI-RADS) in every fifth study."""
    n_usable = 1 if i % 7 == 3 else int(rng.integers(2, 5))
    images = []
    for k in range(n_usable + (1 if i % 5 == 0 else 0)):
        usable = k < n_usable
        images.append({
            "image_id": f"img{i:04d}_{k}", "laterality": "LR"[k % 2], "view": ("CC", "MLO")[k // 2 % 2],
            "image": encode_image(blob_image(rng, side, side - 8)), "codec": "png",
            "height": side, "width": side - 8, "density": int(rng.integers(1, 5)),
            "birads": "ANBPSMK"[int(rng.integers(0, 7))] if usable else None,
            "mass_shape": "oval", "mass_density": "high density", "calc_find": None, "calc_distri": None,
            "source": f"s3://raw/{i}/{k}.dcm",
        })
    return {"study_id": f"st{i:04d}", "patient_id": f"pt{i:04d}", "split": SPLIT_OF[i % 10],
            "procedure": "MG Screening Bilateral", "reason": "screening", "age": 40 + i % 40,
            "race": "White", "ethnicity": "Hispanic or Latino", "images": images}


def make_shards(root: Path, n_studies: int, seed: int, studies_per_file: int = 8, side: int = 48) -> list[dict]:
    """Write ``n_studies`` studies as Parquet shards under ``root``; returns the study rows."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    studies = [make_study(rng, i, side) for i in range(n_studies)]
    for f, start in enumerate(range(0, n_studies, studies_per_file)):
        table = pa.Table.from_pylist(studies[start : start + studies_per_file], schema=SHARD_SCHEMA)
        pq.write_table(table, root / f"shard-{f:05d}.parquet", compression="zstd", row_group_size=4)
    return studies


@pytest.fixture(scope="session")
def write_shards():
    """:func:`make_shards` for any test (conftest modules are not importable under --import-mode=importlib)."""
    return make_shards
