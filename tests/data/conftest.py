"""Fixtures of the data tests: small synthetic shards written to the shard schema (docs/architecture.md).

The pipeline tests write their own shards (independent of the ingest job) with known contents:
which images are usable (complete caption), which study each belongs to, and which split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mama_ray.data.schema import SHARD_SCHEMA
from mama_ray.data.shards import encode_image

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


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """``(folder, studies)``: 60 studies in 8 shards, fixed seed."""
    root = tmp_path_factory.mktemp("shards")
    return root, make_shards(root, 60, seed=7)
