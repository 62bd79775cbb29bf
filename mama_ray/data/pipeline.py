"""The Ray Data pipeline: shards → paired, captioned, augmented, tokenised training samples.

Design (details and the reasons in ``docs/pipeline.md``):

* **A fixed plan per epoch.** A light index (study ids, split and the caption-completeness fields,
  read by Parquet column projection — no image bytes) numbers every usable training image. The
  epoch's order is a function of ``(run.seed, epoch)``: shard files in a permuted order, then a
  deterministic windowed shuffle over ``data.shuffle_buffer`` consecutive samples. Epoch
  position ``p`` goes to rank ``p % W`` as that rank's sample ``j = p // W``; every rank gets
  ``N // W`` samples, so ranks take the same number of steps.
* **Each rank streams its own dataset.** Read units (whole Parquet row groups of one shard that
  hold this rank's studies, in the epoch's file order) → one ``map_batches`` whose tasks read
  their unit and expand each study into this rank's samples: decode, augment, caption,
  tokenise. Samples a resumed run already consumed (``j < skip_samples``) are not in the plan,
  so they are neither read nor decoded. Ray Data's dynamic block hand-out (``streaming_split``)
  cannot give exact resume, so ranks do not share one stream.
* **The next epoch in advance.** Once 3/4 of an epoch's samples have arrived, its successor's
  execution starts on a background thread; asking for exactly that epoch continues it.
* **Order restored on the consumer.** Blocks arrive in file order (``preserve_order``); a small
  reorder buffer (≈ ``shuffle_buffer / W`` samples) yields samples in ``j`` order, so the
  batches are identical whatever the parallelism, and a run restarted at ``j = k`` yields
  exactly the rest of the epoch.
* **Randomness per sample** from ``(run.seed, epoch, p)``: second-view choice (§1.5), meta masking
  (§1.4) and both augmentations (§1.6). The global sample sequence does not depend on W.

Images travel through Ray Data as 1×S×S uint8 (the transforms keep gray images gray); the
collate hands the trainer B×3×S×S uint8 as a broadcast view. Normalisation happens on the device.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mama_ray import storage
from mama_ray.config import Config
from mama_ray.data import captions, transforms
from mama_ray.data.schema import SPLITS
from mama_ray.data.shards import MANIFEST, QUARANTINE, decode_image, read_manifest

READ_COLUMNS = ["study_id", "split", "procedure", "reason", "age", "race", "ethnicity", "images"]
INDEX_STUDY_FIELDS = ("study_id", "split", "procedure", "reason")  # the index reads these …
INDEX_IMAGE_FIELDS = ("density", "birads")  # … and these leaves of `images`: no image bytes
FILE_SALT, WINDOW_SALT = 1, 2  # separate the epoch's random streams from the samples' (salt 0)
INDEX_THREADS = 16  # parallel footer/column reads while indexing (I/O bound)


# ------------------------------------------------------------------------------------------
# Labels and captions from a shard row
# ------------------------------------------------------------------------------------------


def caption_fields(study: dict[str, Any], image: dict[str, Any]) -> captions.CaptionFields:
    """The caption fields of one image of a study row (schema §3.2)."""
    return captions.CaptionFields(
        procedure=study.get("procedure"), reason=study.get("reason"), age=study.get("age"),
        race=study.get("race"), ethnicity=study.get("ethnicity"),
        laterality=image.get("laterality"), view=image.get("view"),
        density=image.get("density"), birads=image.get("birads"),
        mass_shape=image.get("mass_shape"), mass_density=image.get("mass_density"),
        calc_find=image.get("calc_find"), calc_distri=image.get("calc_distri"),
    )


def usable_images(study: dict[str, Any]) -> list[int]:
    """Indices of a study's images with a complete caption (the only ones the method uses)."""
    return [i for i, img in enumerate(study.get("images") or [])
            if captions.is_complete(caption_fields(study, img))]


def density_class(density: int | None) -> int:
    """tissueden 1–4 → class 0–3; male (5) or unknown → −1 (method §1.7)."""
    return int(density) - 1 if density in (1, 2, 3, 4) else -1


def birads_class(letter: str | None) -> int:
    """BI-RADS letter → index in ``ANBPSMK``; unknown → −1."""
    return captions.BIRADS_LETTERS.index(letter) if letter and letter in captions.BIRADS_LETTERS else -1


_TOKENIZERS: dict[str, Any] = {}  # one per process and tokenizer URI: map tasks reuse processes


def tokenize(cfg: Config, texts: list[str]) -> dict[str, np.ndarray]:
    """Model texts → ``input_ids``/``attention_mask`` int64 B×L and ``sep_mask`` bool B×L."""
    from mama_ray.models.tokenizer import encode_texts, load_tokenizer

    if cfg.text.tokenizer not in _TOKENIZERS:
        _TOKENIZERS[cfg.text.tokenizer] = load_tokenizer(cfg)
    return encode_texts(_TOKENIZERS[cfg.text.tokenizer], texts, cfg.text.max_len)


# ------------------------------------------------------------------------------------------
# The index and the epoch plan
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitIndex:
    """Usable images per study of one split, file by file, in file order."""

    files: tuple[str, ...]  # shard paths inside ``fs`` (sorted)
    study_ids: tuple[tuple[str, ...], ...]  # per file: the split's studies in row order
    counts: tuple[np.ndarray, ...]  # per file: usable images of each of those studies
    rows: tuple[np.ndarray, ...]  # per file: the row number of each of those studies in the file
    row_groups: tuple[tuple[int, ...], ...]  # per file: rows of each Parquet row group

    @property
    def num_samples(self) -> int:
        return int(sum(c.sum() for c in self.counts))


def _index_file(fs: pafs.FileSystem, path: str, split: str) -> tuple:
    """``(study ids, usable counts, row numbers, row-group sizes)`` of ``split`` in one shard."""
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        leaves = [pf.schema.column(i).path for i in range(pf.metadata.num_columns)]
        # nested leaves are named images.list.<element|item>.density depending on the writer
        columns = list(INDEX_STUDY_FIELDS) + [c for c in leaves if c.startswith("images.")
                                              and c.rsplit(".", 1)[-1] in INDEX_IMAGE_FIELDS]
        rows = pf.read(columns=columns).to_pylist()
        groups = tuple(pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups))
    mine = [i for i, r in enumerate(rows) if r["split"] == split]
    return (tuple(rows[i]["study_id"] for i in mine), np.array([len(usable_images(rows[i])) for i in mine], np.int64),
            np.array(mine, np.int64), groups)


@functools.lru_cache(maxsize=8)
def _split_index(shards: str, split: str, opts: storage.StorageOptions) -> SplitIndex:
    fs, files = shard_paths(shards, opts)
    with ThreadPoolExecutor(INDEX_THREADS) as pool:
        parts = list(pool.map(lambda p: _index_file(fs, p, split), files))
    ids = [sid for part in parts for sid in part[0]]
    if len(ids) != len(set(ids)):
        raise ValueError(f"data.shards={shards}: a study_id occurs twice (a study must be one row)")
    return SplitIndex(tuple(files), *(tuple(p[k] for p in parts) for k in range(4)))


def shard_paths(shards: str, opts: storage.StorageOptions) -> tuple[pafs.FileSystem, list[str]]:
    """The shard files of ``shards`` as ``(filesystem, sorted paths inside it)``.

    An ingest output lists its shards in ``manifest.json`` (only complete shards are there);
    a folder without one is read as every ``.parquet`` file except the quarantine report.
    """
    fs, root = storage.filesystem(shards, opts)
    if storage.exists(storage.join(shards, MANIFEST), opts):
        files = sorted(f"{root}/{s['file']}" for s in read_manifest(shards, opts)["shards"])
    else:
        files = [f.removeprefix("s3://") for f in storage.list_files(shards, ".parquet", opts)
                 if not f.endswith("/" + QUARANTINE)]
    if not files:
        raise ValueError(f"data.shards={shards}: no .parquet shards found there")
    return fs, files


def split_index(cfg: Config, split: str) -> SplitIndex:
    """The (cached) index of ``split``; raises ValueError when it has no usable image."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {list(SPLITS)}")
    if not cfg.data.shards:
        raise ValueError("data.shards is empty: point it at ingested shards (jobs/prepare_data.py)")
    index = _split_index(cfg.data.shards, split, storage.StorageOptions.from_config(cfg.storage))
    if index.num_samples == 0:
        raise ValueError(f"data.shards={cfg.data.shards}: split '{split}' has no image with a complete caption")
    return index


def samples_per_rank(cfg: Config, world_size: int) -> int:
    """Training samples each rank sees per epoch: ``N // world_size`` (the remainder is dropped)."""
    n = split_index(cfg, "train").num_samples // world_size
    if n == 0:
        raise ValueError(f"{world_size} ranks but only {split_index(cfg, 'train').num_samples} training images")
    return n


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def epoch_positions(index: SplitIndex, seed: int, epoch: int, buffer: int) -> tuple[list[int], np.ndarray]:
    """The epoch's file order and the epoch position of every usable image.

    Returns:
        ``(file_order, positions)``: positions[q] is the epoch position of the q-th usable image in
        the stream that reads files in ``file_order`` (rows in order, images in order).
    """
    order = [int(i) for i in _rng(seed, epoch, FILE_SALT).permutation(len(index.files))]
    n = int(sum(index.counts[i].sum() for i in order))
    positions = np.empty(n, np.int64)
    width = max(1, buffer)
    for start in range(0, n, width):  # a fixed local shuffle inside each window of the stream
        stop = min(n, start + width)
        positions[start:stop] = start + _rng(seed, epoch, WINDOW_SALT, start).permutation(stop - start)
    return order, positions


@dataclass(frozen=True)
class RankPlan:
    """What one rank reads in one epoch."""

    epoch: int
    rank: int
    world_size: int
    num_samples: int  # samples of this rank in the whole epoch
    skip: int  # samples already consumed (resume)
    files: tuple[str, ...]  # shard paths in the epoch's order
    studies: dict[str, tuple[tuple[int, int, int], ...]]  # study → (usable slot, j, epoch position)


def rank_plan(cfg: Config, epoch: int, rank: int, world_size: int, skip_samples: int = 0) -> RankPlan:
    """The deterministic assignment of the epoch's samples to ``rank`` (see the module doc)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    index = split_index(cfg, "train")
    per_rank = samples_per_rank(cfg, world_size)
    if not 0 <= skip_samples <= per_rank:
        raise ValueError(f"skip_samples={skip_samples} is outside 0..{per_rank} (samples per rank)")
    order, positions = epoch_positions(index, cfg.run.seed, epoch, cfg.data.shuffle_buffer)
    studies: dict[str, tuple[tuple[int, int, int], ...]] = {}
    q = 0
    for f in order:
        for sid, count in zip(index.study_ids[f], index.counts[f], strict=True):
            mine = []
            for slot, p in enumerate(positions[q : q + count]):
                j = int(p) // world_size
                if int(p) % world_size == rank and skip_samples <= j < per_rank:
                    mine.append((slot, j, int(p)))
            if mine:
                studies[sid] = tuple(mine)
            q += int(count)
    return RankPlan(epoch, rank, world_size, per_rank, skip_samples,
                    tuple(index.files[f] for f in order), studies)


# ------------------------------------------------------------------------------------------
# Per-batch work (runs in Ray Data map tasks, possibly on CPU-only nodes)
# ------------------------------------------------------------------------------------------


def _second_image(rng: np.random.Generator, usable: list[int], first: int, prob: float) -> int:
    """§1.5: another usable image of the study with probability ``prob``, else the same one."""
    others = [i for i in usable if i != first]
    if rng.random() < prob and others:
        return others[int(rng.integers(len(others)))]
    return first


def _train_sample(cfg: Config, study: dict, usable: list[int], slot: int, epoch: int, p: int) -> dict:
    """One training sample, all randomness from ``(seed, epoch, p)``."""
    rng = _rng(cfg.run.seed, epoch, p, 0)
    i1 = usable[slot]
    i2 = _second_image(rng, usable, i1, cfg.data.second_view_prob)
    masked = captions.sample_masked(rng, cfg.text.mask_meta)
    img1, img2 = study["images"][i1], study["images"][i2]
    pixels1 = decode_image(img1["image"], img1["codec"])
    pixels2 = pixels1 if i2 == i1 else decode_image(img2["image"], img2["codec"])
    size = cfg.data.image_size
    if cfg.data.augment:
        view1 = transforms.train_transform(pixels1, size, rng)
        view2 = transforms.train_transform(pixels2, size, rng)
    else:
        view1, view2 = transforms.eval_transform(pixels1, size), transforms.eval_transform(pixels2, size)
    text = captions.caption_text(caption_fields(study, img1), masked)
    return {"image1": view1[None], "image2": view2[None], "caption": text,
            "density": density_class(img1["density"]), "birads": birads_class(img1["birads"]),
            "study_id": study["study_id"], "image_id": img1["image_id"], "image2_id": img2["image_id"],
            "pair_same_image": i1 == i2, "epoch_position": p}


STRING_KEYS = ("caption", "study_id", "image_id", "image2_id")


def _to_columns(samples: list[dict], texts: list[str], cfg: Config, image_keys: tuple[str, ...]) -> dict:
    """Row dicts → column arrays, with the tokenised captions; empty input keeps the schema."""
    size, out = cfg.data.image_size, {}
    for key in image_keys:
        out[key] = np.stack([s[key] for s in samples]) if samples else np.zeros((0, 1, size, size), np.uint8)
    keys = samples[0].keys() if samples else ()
    for key in keys:
        if key not in image_keys:
            out[key] = np.array([s[key] for s in samples], dtype=str if key in STRING_KEYS else None)
    tokens = tokenize(cfg, texts) if texts else {
        "input_ids": np.zeros((0, cfg.text.max_len), np.int64),
        "attention_mask": np.zeros((0, cfg.text.max_len), np.int64),
        "sep_mask": np.zeros((0, cfg.text.max_len), bool)}
    return {**out, **tokens}


def train_batch(batch: pa.Table, cfg: Config, plan: RankPlan) -> dict[str, np.ndarray]:
    """Map function: study rows → this rank's samples of them (see :func:`_train_sample`)."""
    samples = []
    for study in batch.to_pylist():
        usable = usable_images(study)
        for slot, j, p in plan.studies.get(study["study_id"], ()):
            samples.append({**_train_sample(cfg, study, usable, slot, plan.epoch, p), "sample_index": j})
    texts = [captions.to_model_text(s["caption"]) for s in samples]
    out = _to_columns(samples, texts, cfg, ("image1", "image2"))
    if not samples:  # keep every block's schema identical
        out.update({k: np.zeros(0, str) for k in STRING_KEYS})
        out.update(density=np.zeros(0, np.int64), birads=np.zeros(0, np.int64),
                   pair_same_image=np.zeros(0, bool), epoch_position=np.zeros(0, np.int64),
                   sample_index=np.zeros(0, np.int64))
    return out


EVAL_FIELDS = ("procedure", "reason", "age", "race", "ethnicity", "laterality", "view",
               "density_code", "birads_letter", "mass_shape", "mass_density", "calc_find", "calc_distri")


def eval_batch(batch: pa.Table, cfg: Config) -> dict[str, np.ndarray]:
    """Map function: study rows → one eval row per usable image (eval transform, no masking)."""
    size, rows, texts = cfg.data.image_size, [], []
    for study in batch.to_pylist():
        for i in usable_images(study):
            img = study["images"][i]
            f = caption_fields(study, img)
            pixels = transforms.eval_transform(decode_image(img["image"], img["codec"]), size)
            texts.append(captions.to_model_text(captions.caption_text(f)))
            rows.append({"image": transforms.to_rgb_chw(pixels), "study_id": study["study_id"],
                         "image_id": img["image_id"], "density": density_class(f.density),
                         "birads": birads_class(f.birads), **_eval_fields(f)})
    out = {"image": np.stack([r["image"] for r in rows]) if rows else np.zeros((0, 3, size, size), np.uint8)}
    for key in ("study_id", "image_id", *EVAL_FIELDS):
        out[key] = np.array([("" if r[key] is None else str(r[key])) for r in rows], dtype=str)
    out["density"] = np.array([r["density"] for r in rows], np.int64)
    out["birads"] = np.array([r["birads"] for r in rows], np.int64)
    return {**out, **tokenize(cfg, texts)} if texts else {**out, **_to_columns([], [], cfg, ())}


def _eval_fields(f: captions.CaptionFields) -> dict[str, Any]:
    return {"procedure": f.procedure, "reason": f.reason, "age": f.age, "race": f.race,
            "ethnicity": f.ethnicity, "laterality": f.laterality, "view": f.view,
            "density_code": f.density, "birads_letter": f.birads, "mass_shape": f.mass_shape,
            "mass_density": f.mass_density, "calc_find": f.calc_find, "calc_distri": f.calc_distri}


def eval_caption_fields(row: dict[str, Any]) -> captions.CaptionFields:
    """An eval row (from :func:`build_eval_dataset`) → its unmasked :class:`CaptionFields`."""
    def get(key: str) -> str | None:
        value = str(row[key])
        return value or None

    age = get("age")
    return captions.CaptionFields(
        procedure=get("procedure"), reason=get("reason"), age=int(age) if age else None,
        race=get("race"), ethnicity=get("ethnicity"), laterality=get("laterality"), view=get("view"),
        density=int(get("density_code")), birads=get("birads_letter"), mass_shape=get("mass_shape"),
        mass_density=get("mass_density"), calc_find=get("calc_find"), calc_distri=get("calc_distri"))


# ------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------


def _work_items(index: SplitIndex, files: list[int], wanted, studies_per_item: int) -> list[dict]:
    """Read units in stream order: runs of whole row groups of one shard and the rows to keep.

    Consecutive row groups of a file join one unit until it holds ``studies_per_item`` wanted
    studies; a row group is never split (a unit reads it once), and row groups or files without a
    wanted study are not read at all.

    Args:
        index: the split's index; ``files`` are indices into it, in the order to stream them.
        wanted: ``study_id -> bool``: the studies this stream needs.
    Returns:
        dicts ``{"path", "row_groups": [group], "take": [row in the concatenated groups]}``.
    """
    items = []
    for f in files:
        sizes = index.row_groups[f]
        starts = np.cumsum((0, *sizes))  # first row of each group
        rows = [int(r) for sid, r in zip(index.study_ids[f], index.rows[f], strict=True) if wanted(sid)]
        item: dict | None = None
        for g, group_rows in itertools.groupby(rows, key=lambda r, s=starts: int(np.searchsorted(s, r, "right")) - 1):
            if item is None:
                item, offset = {"path": index.files[f], "row_groups": [], "take": []}, 0
            item["row_groups"].append(g)
            item["take"] += [offset + r - int(starts[g]) for r in group_rows]
            offset += sizes[g]
            if len(item["take"]) >= studies_per_item:
                items.append(item)
                item = None
        if item is not None:
            items.append(item)
    return items


def _study_tables(items: pa.Table, fs: pafs.FileSystem, rows_per_batch: int) -> Iterator[pa.Table]:
    """Map-task side of :func:`_work_items`: read each unit's row groups once, yield its rows in slices."""
    for item in items.to_pylist():
        with fs.open_input_file(item["path"]) as f:
            table = pq.ParquetFile(f).read_row_groups(item["row_groups"], columns=READ_COLUMNS)
        table = table.take(item["take"])
        for start in range(0, table.num_rows, rows_per_batch):
            yield table.slice(start, rows_per_batch)


def train_items(items: pa.Table, cfg: Config, plan: RankPlan, fs: pafs.FileSystem,
                rows_per_batch: int) -> Iterator[dict[str, np.ndarray]]:
    """Map function: read units → this rank's samples, ``rows_per_batch`` studies per output batch."""
    for table in _study_tables(items, fs, rows_per_batch):
        yield train_batch(table, cfg, plan)


def eval_items(items: pa.Table, cfg: Config, fs: pafs.FileSystem, rows_per_batch: int) -> Iterator[dict[str, np.ndarray]]:
    """Map function: read units → eval rows (see :func:`eval_batch`)."""
    for table in _study_tables(items, fs, rows_per_batch):
        yield eval_batch(table, cfg)


# Ray Data lets one execution buffer up to half the object store; while the next epoch is
# prefetched two executions of a rank overlap, so each train execution gets half of that.
STORE_FRACTION_WITH_PREFETCH = 0.25


def _item_dataset(cfg: Config, items: list[dict], fn, fn_kwargs: dict[str, Any], store_fraction: float | None = None):
    """One map task per read unit, in order: the read happens inside the task that decodes.

    Reading in the map task (instead of ``read_parquet`` → ``repartition`` → ``map_batches``) keeps
    shard bytes out of the object store and runs one operator, so Ray Data gives it every CPU and
    an epoch starts after one task hop instead of three (docs/pipeline.md, "Why one operator").
    """
    import ray.data

    fs, _ = storage.filesystem(cfg.data.shards, storage.StorageOptions.from_config(cfg.storage))
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))  # one unit per block → per task
    # Bounds every object in the store: map tasks cut their output at this size.
    ds.context.target_max_block_size = cfg.data.block_mb * 1024**2
    ds.context.override_object_store_memory_limit_fraction = store_fraction  # None = Ray's default
    ds = ds.map_batches(fn, batch_size=None, fn_kwargs={**fn_kwargs, "fs": fs}, **_map_args(cfg))
    return _ordered(ds)


def _map_args(cfg: Config) -> dict[str, Any]:
    args: dict[str, Any] = {"num_cpus": cfg.data.num_cpus_per_map, "batch_format": "pyarrow"}
    if cfg.data.map_concurrency > 0:
        args["concurrency"] = cfg.data.map_concurrency
    return args


def _ordered(ds):
    # Blocks in file order keep the consumer's reorder buffer small; the order itself is
    # restored on the consumer, so this is about memory, never about correctness.
    ds.context.execution_options.preserve_order = True
    return ds


def build_train_dataset(cfg: Config, epoch: int, rank: int = 0, world_size: int = 1,
                        skip_samples: int = 0):
    """Rank ``rank``'s training stream for ``epoch`` (blocks of samples, not yet in order).

    Use :func:`iter_train_batches` to consume it in order; it is also the unit a benchmark times.

    Returns:
        ``(dataset, plan)``: a lazy ``ray.data.Dataset`` and the :class:`RankPlan` it follows.
    """
    plan = rank_plan(cfg, epoch, rank, world_size, skip_samples)
    index = split_index(cfg, "train")
    mean_images = max(1.0, index.num_samples / max(1, sum(len(s) for s in index.study_ids)))
    # map_batch_size counts samples; each study row yields ≈ mean_images / W of them here.
    studies_per_call = max(1, round(cfg.data.map_batch_size * world_size / mean_images))
    number = {path: f for f, path in enumerate(index.files)}
    file_order = [number[path] for path in plan.files]
    items = _work_items(index, file_order, plan.studies.__contains__, studies_per_call)
    ds = _item_dataset(cfg, items, train_items, {"cfg": cfg, "plan": plan, "rows_per_batch": studies_per_call},
                       STORE_FRACTION_WITH_PREFETCH if cfg.data.prefetch_next_epoch else None)
    return ds, plan


def build_eval_dataset(cfg: Config, split: str):
    """One row per usable image of ``split``: eval transform, unmasked caption, labels.

    Columns: ``image`` uint8 3×S×S, ``input_ids``/``attention_mask`` int64 L, ``sep_mask`` bool L,
    ``density``/``birads`` int64 (−1 unknown), ``study_id``, ``image_id`` and the caption fields
    (strings, "" = unknown; :func:`eval_caption_fields` turns a row back into CaptionFields for
    the zero-shot prompts). Rows come in shard order.
    """
    index = split_index(cfg, split)
    rows = cfg.data.map_batch_size
    items = _work_items(index, list(range(len(index.files))), lambda _: True, rows)
    return _item_dataset(cfg, items, eval_items, {"cfg": cfg, "rows_per_batch": rows})


# ------------------------------------------------------------------------------------------
# Worker side: ordered micro-batches with data-wait accounting
# ------------------------------------------------------------------------------------------


TENSOR_KEYS = ("image1", "image2", "input_ids", "attention_mask", "sep_mask", "density", "birads",
               "sample_index", "epoch_position", "pair_same_image")


def collate(rows: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, Any]:
    """Rows (a numpy batch and a row index) → the §3.3 dict of torch tensors and string lists.

    ``image1``/``image2`` come out as B×3×S×S uint8: a broadcast view of the one gray channel (no
    copy; move ``image[:, :1]`` to the device and expand there to send a third of the bytes).
    """
    import torch

    out: dict[str, Any] = {}
    for key in TENSOR_KEYS:
        out[key] = torch.from_numpy(np.stack([b[key][i] for b, i in rows]))
    for key in ("image1", "image2"):
        out[key] = out[key].expand(-1, 3, -1, -1)  # B×1×S×S → B×3×S×S
    for key in STRING_KEYS:
        out[key] = [str(b[key][i]) for b, i in rows]
    return out


def _in_order(blocks: Iterator[dict[str, np.ndarray]], start: int, stop: int):
    """Yield ``(batch, row)`` for sample indices start..stop-1 in order, whatever the arrival order."""
    pending: dict[int, tuple[dict[str, np.ndarray], int]] = {}
    expected = start
    for batch in blocks:
        for i, j in enumerate(batch["sample_index"]):
            assert int(j) not in pending and start <= int(j) < stop, f"sample {j} delivered twice or out of plan"
            pending[int(j)] = (batch, i)
        while expected in pending:
            yield pending.pop(expected)
            expected += 1
    assert expected == stop and not pending, f"stream ended at sample {expected} of {stop}"


def _blocks(dataset, prefetch_batches: int) -> Iterator[dict[str, np.ndarray]]:
    """A dataset's output blocks as numpy column dicts, as they come (the consumer orders them)."""
    return dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=prefetch_batches)


class BlockStream:
    """A dataset's blocks pulled on a background thread into a bounded queue.

    Used to start the next epoch's execution while the trainer still consumes this epoch, so the
    startup of a Ray Data execution (planning, first tasks, the first shuffle window) overlaps
    training instead of stalling it. At most ``depth`` blocks wait in the queue; Ray Data's own
    backpressure bounds the rest.
    """

    _END = object()

    def __init__(self, dataset, prefetch_batches: int, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pull, args=(dataset, prefetch_batches),
                                        name="mama-next-epoch", daemon=True)
        self._thread.start()

    def _pull(self, dataset, prefetch_batches: int) -> None:
        blocks = _blocks(dataset, prefetch_batches)
        try:
            for block in blocks:
                if not self._put(block):
                    return
            self._put(self._END)
        except Exception as e:  # handed to the consumer, raised there
            self._put(e)
        finally:
            getattr(blocks, "close", lambda: None)()  # stops the execution if it is still running

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, Exception):
                raise item
            yield item

    def cancel(self, wait_s: float = 0.0) -> None:
        """Stop pulling and drop what was pulled; the thread stops the execution at its next block.

        Args:
            wait_s: seconds to wait for that (before shutting Ray down); 0 = do not wait.
        """
        self._stop.set()
        while not self._queue.empty():
            self._queue.get_nowait()
        if wait_s > 0:
            self._thread.join(wait_s)


_NEXT_EPOCH: dict[str, tuple[tuple, BlockStream, RankPlan]] = {}  # this process's prefetched epoch
# Share of an epoch's samples received before the next epoch starts: early enough to hide its
# start behind the rest of this epoch, late enough that the two executions overlap only briefly
# (each holds its own share of the object store; at one half, the bounded-memory test spilled).
PREFETCH_AT = 0.75


def _stream_key(cfg: Config, epoch: int, rank: int, world_size: int) -> tuple:
    # The flag decides only whether a stream starts its successor, not what the stream holds:
    # a last epoch asked for with prefetch off still continues the stream started for it.
    return (dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prefetch_next_epoch=True)),
            epoch, rank, world_size)


def _prefetch_epoch(cfg: Config, epoch: int, rank: int, world_size: int) -> None:
    """Start ``epoch`` of ``rank`` (from its first sample) on a background thread."""
    cancel_prefetch()
    dataset, plan = build_train_dataset(cfg, epoch, rank, world_size)
    stream = BlockStream(dataset, cfg.data.prefetch_batches, cfg.data.prefetch_batches)
    _NEXT_EPOCH["next"] = (_stream_key(cfg, epoch, rank, world_size), stream, plan)


def _take_prefetched(cfg: Config, epoch: int, rank: int, world_size: int, skip_samples: int):
    """The prefetched ``(stream, plan)`` if it is exactly this request, else None (and it is dropped)."""
    key, stream, plan = _NEXT_EPOCH.pop("next", (None, None, None))
    if stream is not None and skip_samples == 0 and key == _stream_key(cfg, epoch, rank, world_size):
        return stream, plan
    if stream is not None:
        stream.cancel()
    return None


def cancel_prefetch(wait_s: float = 60.0) -> None:
    """Drop this process's prefetched next epoch, if any, and wait until its execution stopped.

    Call it before ``ray.shutdown()`` in a process that ran whole epochs (tests, benchmarks):
    otherwise the prefetch's execution is cut off mid-task and Ray Data logs errors.
    """
    _, stream, _ = _NEXT_EPOCH.pop("next", (None, None, None))
    if stream is not None:
        stream.cancel(wait_s)


class TrainBatches:
    """Iterator over one rank's micro-batches of one epoch; times the wait in each ``next()``.

    Attributes:
        wait_seconds: total seconds spent blocked in ``next()`` so far.
        last_wait: seconds the latest ``next()`` blocked (the step's data wait).
        num_batches: micro-batches this iterator yields in total.
        plan: the :class:`RankPlan` being followed.
        prefetched: whether the stream was started before this epoch was asked for.
    """

    def __init__(self, dataset, plan: RankPlan, micro_batch_size: int, prefetch_batches: int,
                 drop_last: bool = True, on_most_received=None):
        """``dataset``: a ``ray.data.Dataset`` or a :class:`BlockStream`; ``on_most_received()`` runs
        once ``PREFETCH_AT`` of the samples have arrived (the reorder buffer pulls blocks only as it needs them,
        so "all blocks in" would come a shuffle window before the end: too late to hide a start)."""
        self.plan = plan
        self.prefetched = isinstance(dataset, BlockStream)
        self.wait_seconds = 0.0
        self.last_wait = 0.0
        remaining = plan.num_samples - plan.skip
        self.num_batches = remaining // micro_batch_size if drop_last else -(-remaining // micro_batch_size)
        self._batches = self._generate(dataset, micro_batch_size, prefetch_batches, drop_last, on_most_received)

    def _generate(self, dataset, micro_batch_size: int, prefetch_batches: int, drop_last: bool, on_most_received):
        blocks = iter(dataset) if self.prefetched else _blocks(dataset, prefetch_batches)
        rows = []
        blocks = _on_most_received(blocks, self.plan.num_samples - self.plan.skip, on_most_received)
        for row in _in_order(blocks, self.plan.skip, self.plan.num_samples):
            rows.append(row)
            if len(rows) == micro_batch_size:
                yield collate(rows)
                rows = []
        if rows and not drop_last:
            yield collate(rows)

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            return next(self._batches)
        finally:
            self.last_wait = time.perf_counter() - start
            self.wait_seconds += self.last_wait


def _on_most_received(blocks: Iterator, total: int, callback) -> Iterator:
    """Pass blocks through; call ``callback()`` once ``PREFETCH_AT`` of ``total`` samples have arrived."""
    received, called = 0, callback is None
    for block in blocks:
        received += len(block["sample_index"])
        if not called and received >= PREFETCH_AT * total:
            called = True
            callback()
        yield block
    if not called:
        callback()


def iter_train_batches(cfg: Config, epoch: int, rank: int = 0, world_size: int = 1,
                       skip_samples: int = 0, drop_last: bool = True) -> TrainBatches:
    """Rank ``rank``'s micro-batches of ``epoch`` in the epoch's fixed order (call in the worker).

    With ``data.prefetch_next_epoch`` the next epoch's execution starts once 3/4 of this epoch's
    samples have arrived; a later call for exactly that epoch (from its start, same config but
    for this flag) continues it, any other call drops it. The samples are the same either way.

    Args:
        cfg: the run config (``run.seed``, ``data.*``, ``text.*``, ``train.micro_batch_size``).
        epoch: epoch number (0-based); the order and all augmentations depend on it.
        rank, world_size: this worker's place (``ray.train.get_context()``).
        skip_samples: samples of this epoch this rank already consumed (resume); the iterator
            yields exactly the rest. A multiple of the micro-batch size keeps batches aligned.
        drop_last: drop a last partial micro-batch (the same count on every rank either way).
    Returns:
        A :class:`TrainBatches` yielding dicts with ``image1``/``image2`` uint8 B×3×S×S,
        ``input_ids``/``attention_mask`` int64 B×L, ``sep_mask`` bool B×L, ``density``/``birads``
        int64 (−1 unknown), ``sample_index``/``epoch_position`` int64, ``pair_same_image`` bool,
        and lists ``study_id``, ``image_id``, ``image2_id``, ``caption``.
    """
    taken = _take_prefetched(cfg, epoch, rank, world_size, skip_samples)
    source, plan = taken or build_train_dataset(cfg, epoch, rank, world_size, skip_samples)
    then = functools.partial(_prefetch_epoch, cfg, epoch + 1, rank, world_size) if cfg.data.prefetch_next_epoch else None
    return TrainBatches(source, plan, cfg.train.micro_batch_size, cfg.data.prefetch_batches, drop_last, then)
