"""Shard I/O: the one image encode/decode path, the Parquet shard writer and reader, manifest helpers.

Stored images are grayscale uint8 arrays encoded losslessly (PNG). The training pipeline reads
them back with :func:`decode_image`; nothing else in mama-ray decodes a stored image.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mama_ray.data.schema import SHARD_SCHEMA
from mama_ray.storage import StorageOptions, join, read_bytes

CODECS = ("png",)
PNG_COMPRESSION = 3  # zlib level: shards are already zstd-compressed around it; 3 is ~2× faster than 9


def _check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown image codec {codec!r}; supported: {', '.join(CODECS)}")


def encode_image(arr: np.ndarray, codec: str = "png") -> bytes:
    """Encode an H×W uint8 grayscale image losslessly.

    Args:
        arr: H×W uint8 array.
        codec: ``"png"``.
    Returns:
        The encoded bytes (deterministic for equal input).
    """
    _check_codec(codec)
    if arr.ndim != 2 or arr.dtype != np.uint8:
        raise ValueError(f"encode_image needs an H×W uint8 array, got {arr.dtype} {arr.shape}")
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr), [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise ValueError(f"PNG encoding failed for an image of shape {arr.shape}")
    return buf.tobytes()


def decode_image(data: bytes, codec: str) -> np.ndarray:
    """Decode stored image bytes back to an H×W uint8 grayscale array.

    Args:
        data: bytes written by :func:`encode_image`.
        codec: the codec stored beside them (``"png"``).
    Returns:
        H×W uint8 array.
    """
    _check_codec(codec)
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if arr is None:
        raise ValueError(f"cannot decode {len(data)} bytes as {codec}")
    return arr


# ------------------------------------------------------------------------------------------
# Shard files, quarantine report, manifest (docs/architecture.md, shard schema)
# ------------------------------------------------------------------------------------------

QUARANTINE_SCHEMA = pa.schema([
    ("source", pa.string()),  # URI of the input that was not ingested
    ("image_id", pa.string()),
    ("study_id", pa.string()),
    ("reason", pa.string()),  # one human-readable line
])
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.parquet"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def _parquet(table: pa.Table, row_group_size: int) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
    return buf.getvalue().to_pybytes()


def shard_bytes(rows: list[dict], row_group_studies: int) -> bytes:
    """One shard: study rows (sorted by ``study_id``) as zstd Parquet in :data:`SHARD_SCHEMA`."""
    rows = sorted(rows, key=lambda r: r["study_id"])
    return _parquet(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), max(1, row_group_studies))


def quarantine_bytes(entries: list[dict]) -> bytes:
    """The quarantine report (sorted by source, then reason) as Parquet."""
    entries = sorted(entries, key=lambda e: (e["source"], e["reason"]))
    return _parquet(pa.Table.from_pylist(entries, schema=QUARANTINE_SCHEMA), 1 << 20)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_manifest(shards: str, opts: StorageOptions | None = None) -> dict:
    """The ``manifest.json`` of an ingest output (raises StorageError if there is none)."""
    return json.loads(read_bytes(join(shards, MANIFEST), opts))


def shard_files(shards: str, opts: StorageOptions | None = None) -> list[str]:
    """URIs of the shards a manifest lists, in order."""
    return [join(shards, s["file"]) for s in read_manifest(shards, opts)["shards"]]


def iter_row_groups(fs: pafs.FileSystem, path: str, columns: list[str],
                    row_groups: Iterable[int] | None = None) -> Iterator[pa.Table]:
    """The row groups ``row_groups`` (all when None) of one shard, ``columns`` only, one table each.

    The one loop that reads a shard: the file is opened once, and only one row group is in
    memory at a time unless the caller keeps them.
    """
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        for g in range(pf.num_row_groups) if row_groups is None else row_groups:
            yield pf.read_row_group(g, columns=columns)


def read_rows(fs: pafs.FileSystem, path: str, groups: tuple[int, ...], rows: list[int],
              columns: list[str]) -> pa.Table:
    """Rows ``rows`` (row numbers in the file, at least one, in that order) of one shard, reading only their row groups.

    Args:
        groups: the number of rows of each row group of the file, in order.
    """
    starts = np.cumsum((0, *groups))  # the file's row number of each group's first row
    group_of = [int(np.searchsorted(starts, r, "right")) - 1 for r in rows]
    wanted = sorted(set(group_of))
    table = pa.concat_tables(iter_row_groups(fs, path, columns, wanted))
    at = dict(zip(wanted, np.cumsum((0, *(groups[g] for g in wanted)))[:-1].tolist(), strict=True))  # group → its first row in ``table``
    return table.take([at[g] + r - int(starts[g]) for r, g in zip(rows, group_of, strict=True)])
