"""The one shard reader (mama_ray.data.shards): row groups in order, chosen rows, and its users."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mama_ray import config, storage
from mama_ray.data.pipeline import READ_COLUMNS, eval_batch, shard_paths
from mama_ray.data.shards import iter_row_groups, read_rows

COLUMNS = ["study_id", "split"]


def test_row_groups_come_in_file_order_one_table_each(shard_set):
    root, studies = shard_set  # 8 studies per file, row groups of 4
    fs, files = shard_paths(str(root), storage.StorageOptions())
    groups = [g for path in files for g in iter_row_groups(fs, path, COLUMNS)]
    assert [g.num_rows for g in groups] == [4] * 15  # 60 studies: 7 files of 8 and one of 4
    assert [sid for g in groups for sid in g["study_id"].to_pylist()] == [s["study_id"] for s in studies]
    second = list(iter_row_groups(fs, files[2], COLUMNS, row_groups=[1]))
    assert [g["study_id"].to_pylist() for g in second] == [[s["study_id"] for s in studies[20:24]]]
    assert second[0].column_names == COLUMNS


def test_read_rows_returns_the_rows_asked_for_in_that_order(shard_set):
    root, studies = shard_set
    fs, files = shard_paths(str(root), storage.StorageOptions())
    got = read_rows(fs, files[1], (4, 4), [6, 1, 4, 7], COLUMNS)  # file 1 holds studies 8..15
    assert got["study_id"].to_pylist() == [studies[8 + r]["study_id"] for r in (6, 1, 4, 7)]
    assert read_rows(fs, files[1], (4, 4), [5], COLUMNS)["study_id"].to_pylist() == [studies[13]["study_id"]]


def _first_rows_reference(cfg, n):
    """first_eval_rows as it read before the one reader: pyarrow's iter_batches over each file."""
    fs, files = shard_paths(cfg.data.shards, storage.StorageOptions())
    parts = []
    for path in files:
        with fs.open_input_file(path) as f:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=cfg.data.map_batch_size, columns=READ_COLUMNS):
                table = pa.Table.from_batches([rb])
                parts.append(eval_batch(table.filter(pc.equal(table["split"], cfg.eval.split)), cfg))
    return {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]}


def test_first_eval_rows_reads_through_the_one_reader_unchanged(shard_set):
    from mama_ray.eval.runner import first_eval_rows

    cfg = config.load("tiny_cpu", {"data.shards": str(shard_set[0]), "data.map_batch_size": 3})
    for n in (5, 10_000):  # a few rows, and more than the split has
        got, want = first_eval_rows(cfg, n), _first_rows_reference(cfg, n)
        assert sorted(got) == sorted(want) and len(got["image_id"]) == min(n, len(want["image_id"]))
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
