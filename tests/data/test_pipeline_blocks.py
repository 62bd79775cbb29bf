"""Blocks between the map tasks and collate: cut on micro-batch boundaries, read without copies."""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import pytest

from mama_ray import config, storage
from mama_ray.data import samples, stream
from mama_ray.data.plan import rank_plan, split_index

MICRO, MAP_BATCH = 4, 6


def test_map_output_batches_end_on_micro_batch_boundaries(shard_set):
    cfg = config.load("tiny_cpu", {"data.shards": str(shard_set[0]), "data.image_size": 16,
                                   "train.micro_batch_size": MICRO, "data.map_batch_size": MAP_BATCH,
                                   "data.plan_window": 40})
    fs, _ = storage.filesystem(cfg.data.shards, storage.StorageOptions.from_config(cfg.storage))
    plan = rank_plan(cfg, 0, 0, 1)
    items = stream.window_items(split_index(cfg, "train"), plan)
    assert len(items) >= 2  # several windows: each one's own last batch
    for item in items:
        batches = [b["sample_index"].tolist() for b in stream.train_items(pa.Table.from_pylist([item]), cfg, 0, fs)]
        assert [j for b in batches for j in b] == item["j"]  # every sample once, in plan order
        for b in batches[:-1]:
            # the first micro-batch boundary at or after MAP_BATCH samples: 8 when the batch starts on one
            assert (b[-1] + 1) % MICRO == 0 and MAP_BATCH <= len(b) < MAP_BATCH + MICRO, b
        assert batches[-1][-1] == item["j"][-1]


def _block(first: int, n: int, size: int = 3) -> dict[str, np.ndarray]:
    """A numpy block of ``n`` rows with every key collate reads; sample indices from ``first``."""
    rng = np.random.default_rng(first)
    block = {key: rng.integers(0, 255, (n, 1, size, size), dtype=np.uint8) for key in ("image1", "image2")}
    for key in ("input_ids", "attention_mask", "sep_mask"):
        block[key] = rng.integers(0, 9, (n, 5))
    for key in ("density", "birads", "epoch_position", "sample_id", "pair_same_image"):
        block[key] = rng.integers(0, 4, n)
    block["sample_index"] = np.arange(first, first + n)
    for key in samples.STRING_KEYS:
        block[key] = np.array([f"{key}-{first + i}" for i in range(n)], dtype=object)
    return block


def _expected(rows) -> dict[str, np.ndarray]:
    return {key: np.stack([b[key][i] for b, i in rows]) for key in stream.TENSOR_KEYS}


@pytest.mark.parametrize("read_only", [False, True])
def test_a_micro_batch_inside_one_block_is_a_slice_of_it(read_only):
    block = _block(10, 8)
    if read_only:  # as a block still in the object store
        for a in block.values():
            a.setflags(write=False)
    rows = [(block, i) for i in range(2, 6)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable" warning from torch either
        out = stream.collate(rows)
    for key, want in _expected(rows).items():
        got = out[key][:, :1].numpy() if key in ("image1", "image2") else out[key].numpy()
        np.testing.assert_array_equal(got, want)
        assert np.shares_memory(got, block[key]), key  # no copy
    assert out["image1"].shape == (4, 3, 3, 3) and out["image_id"] == [f"image_id-{j}" for j in range(12, 16)]


def test_rows_from_two_blocks_or_with_a_gap_are_copied_together():
    a, b = _block(0, 4), _block(4, 4)
    for rows in ([(a, 2), (a, 3), (b, 0), (b, 1)], [(a, 0), (a, 1), (a, 3)]):
        out = stream.collate(rows)
        for key, want in _expected(rows).items():
            got = out[key][:, :1].numpy() if key in ("image1", "image2") else out[key].numpy()
            np.testing.assert_array_equal(got, want)
            assert not np.shares_memory(got, a[key]) and not np.shares_memory(got, b[key])
        assert out["sample_index"].tolist() == [int(blk["sample_index"][i]) for blk, i in rows]


def test_a_block_of_several_chunks_reads_as_views_of_each():
    from ray.data.block import BlockAccessor

    parts = [_block(0, 3), _block(3, 5), _block(8, 2)]
    table = pa.concat_tables([BlockAccessor.batch_to_block(p) for p in parts])
    assert table.column("image1").num_chunks == 3  # what Ray Data's numpy format would concatenate
    chunks = list(stream._numpy_chunks(table))
    assert [len(c["sample_index"]) for c in chunks] == [3, 5, 2]
    for chunk, part in zip(chunks, parts, strict=True):
        for key in ("image1", "input_ids", "sample_index"):
            np.testing.assert_array_equal(chunk[key], part[key])
            assert np.shares_memory(chunk[key], part[key]), key
        assert chunk["study_id"].tolist() == part["study_id"].tolist()
