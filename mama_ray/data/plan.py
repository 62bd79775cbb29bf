"""The index of a split and the epoch plan: which rank reads which row groups, and in what order.

Design (the reasons and the costs in ``docs/pipeline.md``, "The epoch plan"):

* **Index.** A light pass over the shards (Parquet column projection, no image bytes) numbers
  every usable image of the split: study by study in file and row order, image ``q`` = the
  ``q``-th usable image of that canonical order. ``q`` is a sample's identity in every epoch.
* **Read units = Parquet row groups.** Every epoch the row groups holding a sample are
  permuted (seed, epoch) and dealt to the ``W`` ranks whole, largest first to the least loaded
  rank (LPT), so ranks read disjoint row groups: each shard byte once per epoch.
* **Equal lengths.** Every rank takes the same number ``L`` of samples, a multiple of the
  micro-batch. ``L`` is the shortest rank's load unless that drops more than one global batch or
  1 % of the epoch; then over-full ranks hand their surplus samples to short ranks (those row
  groups are read by two ranks — only on small data sets, where a few row groups carry a rank).
* **Spread order inside a rank.** A rank's row groups, in the epoch's order, form windows of at
  least ``data.plan_window`` samples. Inside a window the ``c`` images of a study land one in
  each of ``c`` equal strata of the window at independent random places, then a greedy pass
  keeps a study's images at least one micro-batch apart, so images of one study (near-identical
  captions: each other's worst negatives) never share a micro-batch. One map task reads one
  window and emits it in this order.
* **Elastic resume.** A plan can be made of what an epoch has *left*: replaying the segments an
  epoch ran (world size, samples per rank consumed) gives the samples consumed, and the rest is
  planned again among the new ranks (:func:`epoch_plan`'s ``history``).

Everything is a function of ``(run.seed, epoch)``, the index, the world size, the micro-batch
size and the history: every rank computes the whole plan and takes its own part.
"""

from __future__ import annotations

import bisect
import functools
import heapq
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mama_ray import storage
from mama_ray.config import Config
from mama_ray.data.samples import usable_images
from mama_ray.data.schema import SPLITS
from mama_ray.data.shards import MANIFEST, QUARANTINE, read_manifest

INDEX_STUDY_FIELDS = ("study_id", "split", "procedure", "reason")  # the index reads these …
INDEX_IMAGE_FIELDS = ("density", "birads")  # … and these leaves of `images`: no image bytes
UNIT_SALT, WINDOW_SALT = 1, 2  # separate the epoch's random streams from the samples' (salt 0)
INDEX_THREADS = 16  # parallel footer/column reads while indexing (I/O bound)
MIN_WINDOWS = 8  # a rank's epoch is at least this many windows (map tasks) when its row groups allow
DROP_SHARE = 0.01  # an epoch may drop this share of its samples (or one global batch) to equalise ranks


# ------------------------------------------------------------------------------------------
# The index
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: the index is cached per shard URI
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

    @classmethod
    def laid_out(cls, counts: np.ndarray, studies_per_group: int, studies_per_file: int) -> SplitIndex:
        """An index without shards: studies ``s0, s1, …`` with these usable-image counts, in files of
        ``studies_per_file`` and row groups of ``studies_per_group`` (planning benchmarks and tests)."""
        files, ids, cs, rows, groups = [], [], [], [], []
        for f, start in enumerate(range(0, len(counts), studies_per_file)):
            n = min(studies_per_file, len(counts) - start)
            files.append(f"shard-{f:05d}.parquet")
            ids.append(tuple(f"s{i}" for i in range(start, start + n)))
            cs.append(np.asarray(counts[start : start + n], dtype=np.int64))
            rows.append(np.arange(n, dtype=np.int64))
            groups.append(tuple(min(studies_per_group, n - g) for g in range(0, n, studies_per_group)))
        return cls(tuple(files), tuple(ids), tuple(cs), tuple(rows), tuple(groups))

    @functools.cached_property
    def flat(self) -> FlatIndex:
        return FlatIndex.of(self)


@dataclass(frozen=True)
class FlatIndex:
    """The index as arrays: per study (canonical order), per read unit, per sample ``q``."""

    study_unit: np.ndarray  # S: read unit (row group) of each study
    study_row: np.ndarray  # S: its row inside that row group
    study_count: np.ndarray  # S: usable images
    study_first: np.ndarray  # S: q of its first usable image
    unit_file: np.ndarray  # U: file index of each read unit
    unit_group: np.ndarray  # U: row group inside that file
    sample_study: np.ndarray  # N: study of sample q
    sample_slot: np.ndarray  # N: which usable image of its study

    @classmethod
    def of(cls, index: SplitIndex) -> FlatIndex:
        unit_of: dict[tuple[int, int], int] = {}
        s_unit, s_row = [], []
        for f, (rows, sizes) in enumerate(zip(index.rows, index.row_groups, strict=True)):
            starts = np.cumsum((0, *sizes))
            groups = np.searchsorted(starts, rows, "right") - 1
            for r, g in zip(rows.tolist(), groups.tolist(), strict=True):
                s_unit.append(unit_of.setdefault((f, g), len(unit_of)))
                s_row.append(r - int(starts[g]))
        count = np.concatenate([*index.counts, np.zeros(0, np.int64)]).astype(np.int64)
        first = np.concatenate(([0], np.cumsum(count)[:-1])).astype(np.int64)
        study = np.repeat(np.arange(len(count)), count)
        slot = np.arange(len(study)) - np.repeat(first, count)
        keys = list(unit_of)
        return cls(np.array(s_unit, np.int64), np.array(s_row, np.int64), count, first,
                   np.array([k[0] for k in keys], np.int64), np.array([k[1] for k in keys], np.int64),
                   study, slot)

    @property
    def sample_unit(self) -> np.ndarray:  # N
        return self.study_unit[self.sample_study]


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


# ------------------------------------------------------------------------------------------
# The epoch plan
# ------------------------------------------------------------------------------------------


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


@dataclass(frozen=True)
class Window:
    """Consecutive samples of one rank that one map task reads and emits, in emit order."""

    start: int  # rank sample index j of the first sample
    units: tuple[int, ...]  # read units (row groups) the task reads, each once
    samples: np.ndarray  # n: sample ids q in emit order

    @property
    def stop(self) -> int:
        return self.start + len(self.samples)


@dataclass(frozen=True)
class RankPlan:
    """What one rank reads and emits in one epoch (or in what is left of it)."""

    epoch: int
    rank: int
    world_size: int
    num_samples: int  # L: samples of every rank in this (segment of the) epoch
    skip: int  # samples already consumed (exact resume)
    windows: tuple[Window, ...]  # in stream order, covering j = 0..L-1
    position_offset: int = 0  # samples the whole cluster consumed in earlier segments of the epoch

    @property
    def samples(self) -> np.ndarray:  # L: sample id q of each j
        return np.concatenate([w.samples for w in self.windows]) if self.windows else np.zeros(0, np.int64)

    def epoch_position(self, j: int) -> int:
        """Place of sample ``j`` in the epoch's global order (global micro-batch m = consecutive positions)."""
        return self.position_offset + j * self.world_size + self.rank


@dataclass(frozen=True)
class PlanParams:
    """What besides the index an epoch plan depends on."""

    seed: int
    epoch: int
    micro_batch: int  # samples per micro-batch: the spacing of a study's images, and L's granule
    global_batch: int  # samples per optimizer step over all ranks at this world size (drop allowance)
    window: int  # samples per ordering window (at least)

    @classmethod
    def of(cls, cfg: Config, epoch: int, world_size: int) -> PlanParams:
        mbs = cfg.train.micro_batch_size
        return cls(cfg.run.seed, epoch, mbs, mbs * cfg.train.grad_accum * world_size, cfg.data.plan_window)


def deal_units(sizes: np.ndarray, order: np.ndarray, world_size: int) -> list[list[int]]:
    """Longest-processing-time bin packing: units largest first (ties in ``order``) to the least loaded rank.

    Returns:
        per rank, its units in ``order`` (the epoch's random order, not the packing order).
    """
    place = np.argsort(order)
    heap = [(0, r) for r in range(world_size)]
    owner = np.empty(len(sizes), np.int64)
    for u in order[np.argsort(-sizes[order], kind="stable")]:
        load, r = heapq.heappop(heap)
        owner[u] = r
        heapq.heappush(heap, (load + int(sizes[u]), r))
    return [sorted(np.flatnonzero(owner == r).tolist(), key=place.__getitem__) for r in range(world_size)]


def top_up(dealt: list[list[int]], sizes: np.ndarray, length: int) -> list[list[int]]:
    """Move or swap whole units so that fewer ranks hold less than ``length`` samples.

    Each rank left short costs a row group read twice (:func:`equalise`), so this first tries,
    rank by rank, the single move or swap from a rank above ``length`` that leaves the short rank
    the least short without taking the other below ``length``.
    """
    dealt = [list(mine) for mine in dealt]
    loads = [int(sizes[mine].sum()) for mine in dealt]
    improved = True
    while improved:
        improved = False
        for r in sorted((r for r in range(len(dealt)) if loads[r] < length), key=loads.__getitem__):
            deficit = length - loads[r]
            best = (deficit, 0, None)  # (deficit after, size moved, (donor, unit in, unit out))
            mine = sorted((int(sizes[b]), b) for b in dealt[r])  # the short rank's units by size
            for d in (d for d in range(len(dealt)) if loads[d] > length):
                for a in dealt[d]:
                    for delta, b in _exchanges(int(sizes[a]), mine, deficit, loads[d] - length):
                        best = min(best, (max(0, deficit - delta), delta, (d, a, b)), key=lambda c: c[:2])
            if best[2] is not None and best[0] < deficit:
                d, a, b = best[2]
                dealt[d].remove(a)
                dealt[r].append(a)
                if b is not None:
                    dealt[r].remove(b)
                    dealt[d].append(b)
                loads[d] -= best[1]
                loads[r] += best[1]
                improved = True
    return dealt


def _exchanges(size_a: int, mine: list[tuple[int, int]], deficit: int, surplus: int):
    """Candidate ``(samples moved, unit given back or None)`` for taking a unit of ``size_a``.

    The donor may lose at most ``surplus``; of the swaps, only the two that matter: the smallest
    move that covers ``deficit`` and the largest move within ``surplus`` (``mine`` sorted by size).
    """
    if size_a <= surplus:
        yield size_a, None
    sizes = [s for s, _ in mine]
    lo = bisect.bisect_left(sizes, size_a - surplus)  # swaps from here on keep the donor ≥ length
    hi = bisect.bisect_right(sizes, size_a - deficit)  # swaps before this cover the deficit
    if lo < hi:
        yield size_a - sizes[hi - 1], mine[hi - 1][1]
    if lo < len(sizes) and sizes[lo] < size_a:
        yield size_a - sizes[lo], mine[lo][1]


def common_length(loads: list[int], params: PlanParams) -> int:
    """``L``: the shortest rank's load unless that drops more than allowed, then as few moves as allowed."""
    total, world = sum(loads), len(loads)
    mbs = params.micro_batch
    best = total // world // mbs * mbs
    if best == 0:
        raise ValueError(f"{world} ranks but only {total} training samples: less than one "
                         f"micro-batch of {mbs} per rank")
    allowed = max(params.global_batch, int(DROP_SHARE * total))
    length = min(loads) // mbs * mbs
    if total - world * length > allowed:
        length = min(best, -(-(total - allowed) // world // mbs) * mbs)
        length = length if total - world * length <= allowed else best
    return length


def equalise(pieces: list[list[tuple[int, np.ndarray]]], length: int) -> list[list[tuple[int, np.ndarray]]]:
    """Cut every rank to ``length`` samples; surplus pieces fill short ranks, the rest is dropped.

    Args:
        pieces: per rank, ``(unit, sample ids)`` in stream order.
    """
    kept, surplus = [], []
    for mine in pieces:
        out, n = [], 0
        for unit, ids in mine:
            take = min(len(ids), length - n)
            if take > 0:
                out.append((unit, ids[:take]))
            if take < len(ids):
                surplus.append((unit, ids[max(take, 0):]))
            n += max(take, 0)
        kept.append(out)
    surplus.sort(key=lambda piece: -len(piece[1]))  # few large pieces: few row groups read twice
    for out in kept:
        need = length - sum(len(ids) for _, ids in out)
        while need > 0:
            unit, ids = surplus.pop(0)
            out.append((unit, ids[:need]))
            if len(ids) > need:
                surplus.insert(0, (unit, ids[need:]))
            need -= min(need, len(ids))
    return kept


def spread(study: np.ndarray, rng: np.random.Generator, gap: int) -> np.ndarray:
    """Emit order of a window's samples: each study's images apart by ≥ ``gap`` where the window allows.

    The ``c`` images of a study go one into each of ``c`` equal strata of the window, at
    independent uniform places (so which studies share a micro-batch changes from stratum to
    stratum, as under a global shuffle); a greedy pass then emits, at every position, the first
    sample in that order whose study was last emitted ``gap`` or more positions before.

    Args:
        study: n: the study of each sample.
    Returns:
        n: indices into ``study`` in emit order.
    """
    n = len(study)
    by_study = np.lexsort((rng.random(n), study))  # samples grouped by study, random inside
    sorted_study = study[by_study]
    first = np.flatnonzero(np.r_[True, sorted_study[1:] != sorted_study[:-1]])
    count = np.diff(np.r_[first, n])
    k = np.arange(n) - np.repeat(first, count)  # k-th image of its study
    key = (k + rng.random(n)) / np.repeat(count, count)
    priority = by_study[np.argsort(key, kind="stable")]
    return _keep_apart(priority, study, gap)


def _keep_apart(priority: np.ndarray, study: np.ndarray, gap: int) -> np.ndarray:
    """Greedy: the first sample of ``priority`` whose study was not emitted in the last ``gap`` positions."""
    last: dict[int, int] = {}
    waiting: list[int] = []  # passed over, in priority order
    out, it = [], iter(priority.tolist())
    for t in range(len(priority)):
        pick = next((w for w in waiting if last.get(int(study[w]), -gap) <= t - gap), None)
        if pick is not None:
            waiting.remove(pick)
        else:
            for i in it:
                if last.get(int(study[i]), -gap) <= t - gap:
                    pick = i
                    break
                waiting.append(i)
            if pick is None:  # only studies emitted just before are left: the window cannot keep them apart
                pick = waiting.pop(0)
        last[int(study[pick])] = t
        out.append(pick)
    return np.array(out, np.int64)


def windows_of(pieces: list[tuple[int, np.ndarray]], flat: FlatIndex, rng: np.random.Generator,
               params: PlanParams) -> tuple[Window, ...]:
    """Group a rank's pieces (in stream order) into windows and order each.

    A window holds at least ``params.window`` samples, or 1/``MIN_WINDOWS`` of the rank's when
    that is less (one map task per window: a rank needs a few to keep its CPUs busy), but never
    less than the micro-batches needed to keep the largest study's images apart. A unit's
    samples stay in one window (a window reads its row groups once); a last window smaller than
    the target joins the one before.
    """
    total = sum(len(ids) for _, ids in pieces)
    most = max((int(flat.study_count[flat.sample_study[ids]].max()) for _, ids in pieces if len(ids)), default=1)
    # at least (most images of a study) micro-batches: room to keep every study's images apart
    target = max(most * params.micro_batch, min(params.window, total // MIN_WINDOWS))
    groups: list[list[tuple[int, np.ndarray]]] = []
    size = 0
    for piece in pieces:
        if not groups or size >= target:
            groups.append([])
            size = 0
        groups[-1].append(piece)
        size += len(piece[1])
    if len(groups) > 1 and size < target:
        tail = groups.pop()
        groups[-1] += tail
    out, start = [], 0
    for group in groups:
        ids = np.concatenate([ids for _, ids in group])
        order = ids[spread(flat.sample_study[ids], rng, params.micro_batch)]
        out.append(Window(start, tuple(dict.fromkeys(u for u, _ in group)), order))
        start += len(ids)
    return tuple(out)


def plan_pool(flat: FlatIndex, pool: np.ndarray, world_size: int, params: PlanParams,
              segment: int = 0) -> list[tuple[Window, ...]]:
    """Windows of every rank for the samples ``pool`` (sample ids q), ranks of equal length.

    Args:
        segment: which restart of the epoch this is (0 = its start): a fresh random stream each.
    """
    unit_of = flat.sample_unit[pool]
    pool = pool[np.argsort(unit_of, kind="stable")]
    units, first = np.unique(flat.sample_unit[pool], return_index=True)
    per_unit = np.split(pool, first[1:])  # canonical sample order inside each unit
    sizes = np.array([len(ids) for ids in per_unit], np.int64)
    order = _rng(params.seed, params.epoch, UNIT_SALT, segment).permutation(len(units))
    dealt = deal_units(sizes, order, world_size)
    length = common_length([int(sizes[mine].sum()) for mine in dealt], params)
    place = np.argsort(order)  # each unit's place in the epoch's order
    dealt = [sorted(mine, key=place.__getitem__) for mine in top_up(dealt, sizes, length)]
    pieces = [[(int(units[i]), per_unit[i]) for i in mine] for mine in dealt]
    pieces = equalise(pieces, length)
    return [windows_of(mine, flat, _rng(params.seed, params.epoch, WINDOW_SALT, segment, r), params)
            for r, mine in enumerate(pieces)]


Segment = tuple[int, int, int, int]  # world size, samples per rank consumed, micro-batch, grad_accum


def epoch_plan(index: SplitIndex, params: PlanParams, world_size: int,
               history: tuple[Segment, ...] = ()) -> tuple[list[tuple[Window, ...]], int]:
    """Every rank's windows for what is left of an epoch after ``history``.

    Args:
        history: ``(world size, samples per rank consumed, micro-batch, grad_accum)`` of each
            earlier segment of this epoch (a run restarted with another world size); empty = the
            epoch from its start. Each segment's plan is made again to know what it consumed.
    Returns:
        ``(windows per rank, samples consumed cluster-wide in the earlier segments)``; after a
        history, ranks may get nothing when less than a micro-batch per rank is left.
    """
    flat = index.flat
    pool = np.arange(index.num_samples, dtype=np.int64)
    consumed_total = 0
    for segment, (world, consumed, mbs, accum) in enumerate(history):
        seg_params = PlanParams(params.seed, params.epoch, mbs, mbs * accum * world, params.window)
        ranks = plan_pool(flat, pool, world, seg_params, segment)
        done = np.concatenate([_first(windows, consumed) for windows in ranks])
        pool = np.setdiff1d(pool, done, assume_unique=True)
        consumed_total += len(done)
    if history and len(pool) // world_size < params.micro_batch:  # the epoch is as good as done
        return [() for _ in range(world_size)], consumed_total
    return plan_pool(flat, pool, world_size, params, len(history)), consumed_total


def _first(windows: tuple[Window, ...], n: int) -> np.ndarray:
    ids = np.concatenate([w.samples for w in windows])
    if not 0 <= n <= len(ids):
        raise ValueError(f"a checkpoint says {n} samples of a rank were consumed, but its plan has {len(ids)}")
    return ids[:n]


def rank_plan(cfg: Config, epoch: int, rank: int, world_size: int, skip_samples: int = 0,
              history: tuple[Segment, ...] = ()) -> RankPlan:
    """Rank ``rank``'s part of the epoch plan (see the module doc); ``skip_samples`` already consumed."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    index = split_index(cfg, "train")
    history = tuple(tuple(int(v) for v in seg) for seg in history)
    ranks, offset = _cached_plan(index, PlanParams.of(cfg, epoch, world_size), world_size, history)
    length = sum(len(w.samples) for w in ranks[rank])
    if not 0 <= skip_samples <= length:
        raise ValueError(f"skip_samples={skip_samples} is outside 0..{length} (samples per rank)")
    return RankPlan(epoch, rank, world_size, length, skip_samples, ranks[rank], offset)


@functools.lru_cache(maxsize=4)
def _cached_plan(index: SplitIndex, params: PlanParams, world_size: int, history: tuple) -> tuple:
    return epoch_plan(index, params, world_size, history)


def samples_per_rank(cfg: Config, world_size: int, epoch: int = 0) -> int:
    """Training samples each rank sees in ``epoch`` (the same on every rank; varies a little by epoch)."""
    return rank_plan(cfg, epoch, 0, world_size).num_samples
