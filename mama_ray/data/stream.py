"""Ray Data datasets of the plan and the ordered stream a training rank consumes.

* **One map task per window** (:class:`~mama_ray.data.plan.Window`): the task reads the window's
  row groups once, inside the task (shard bytes never enter the object store), and emits its
  samples already in the plan's order, in output batches of at least ``data.map_batch_size`` that
  end on micro-batch boundaries. Blocks keep task order (``preserve_order``), so the consumer's
  reorder buffer holds at most a block, and a micro-batch inside one block is handed out as a slice
  of it (no copy, :func:`collate`).
* **The next epoch in advance**: :class:`TrainStream` (one per rank, owned by the loop's batch
  source) starts the next epoch's execution on a background thread once 3/4 of this epoch's
  samples have arrived, and continues it when exactly that epoch is asked for.
"""

from __future__ import annotations

import functools
import itertools
import queue
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mama_ray import storage
from mama_ray.config import Config
from mama_ray.data import samples, transforms
from mama_ray.data.plan import RankPlan, SplitIndex, rank_plan, split_index
from mama_ray.monitoring import DataMonitor

# ------------------------------------------------------------------------------------------
# Map tasks
# ------------------------------------------------------------------------------------------


def window_items(index: SplitIndex, plan: RankPlan) -> list[dict]:
    """One item per window with a sample left to emit: its row groups and its samples in order.

    Returns:
        dicts ``{"paths", "groups": [row group per unit], "unit": [unit of each sample],
        "row": [row in that group], "slot", "q", "j", "p"}`` (only samples ``j >= plan.skip``).
    """
    flat = index.flat
    items = []
    for w in plan.windows:
        if w.stop <= plan.skip:
            continue
        first = max(0, plan.skip - w.start)
        q = w.samples[first:]
        study = flat.sample_study[q]
        local = {u: i for i, u in enumerate(w.units)}
        j = np.arange(w.start + first, w.stop)
        items.append({
            "paths": [index.files[flat.unit_file[u]] for u in w.units],
            "groups": [int(flat.unit_group[u]) for u in w.units],
            "unit": [local[int(u)] for u in flat.study_unit[study]],
            "row": flat.study_row[study].tolist(), "slot": flat.sample_slot[q].tolist(),
            "q": q.tolist(), "j": j.tolist(), "p": [plan.epoch_position(int(k)) for k in j]})
    return items


def _read_groups(fs: pafs.FileSystem, paths: list[str], groups: list[int]) -> list[pa.Table]:
    """Each listed row group once (consecutive groups of one file in one read)."""
    tables = []
    for path, run in itertools.groupby(zip(paths, groups, strict=True), key=lambda pg: pg[0]):
        run_groups = [g for _, g in run]
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            tables += [pf.read_row_group(g, columns=samples.READ_COLUMNS) for g in run_groups]
    return tables


def train_items(items: pa.Table, cfg: Config, epoch: int, fs: pafs.FileSystem) -> Iterator[dict[str, np.ndarray]]:
    """Map function: windows → their training samples in plan order.

    An output batch holds at least ``map_batch_size`` samples and ends where a micro-batch ends (rank
    sample index ``j + 1`` a multiple of ``train.micro_batch_size``; a window's last batch may not), so
    the consumer's micro-batches are consecutive rows of one block (:func:`collate` slices them).
    """
    transforms.limit_threads(cfg.data.num_cpus_per_map)
    micro = cfg.train.micro_batch_size
    for item in items.to_pylist():
        tables = _read_groups(fs, item["paths"], item["groups"])
        studies = list(zip(item["unit"], item["row"], strict=True))
        last = {study: k for k, study in enumerate(studies)}  # a study's last sample in this window
        views = samples.BaseViews(cfg.data.image_size, cfg.data.view_cache_mb * 2**20)
        rows: dict[tuple[int, int], dict] = {}
        batch = []
        for k, (study, slot, q, j, p) in enumerate(zip(studies, item["slot"], item["q"], item["j"], item["p"],
                                                       strict=True)):
            if study not in rows:
                rows[study] = tables[study[0]].slice(study[1], 1).to_pylist()[0]
            batch.append({**samples.train_sample(cfg, rows[study], slot, epoch, q, views, study),
                          "sample_index": j, "epoch_position": p, "sample_id": q})
            if last[study] == k:
                views.release(study)
            if len(batch) >= cfg.data.map_batch_size and (j + 1) % micro == 0:
                yield samples.train_columns(cfg, batch)
                batch = []
        if batch:
            yield samples.train_columns(cfg, batch)


def _work_items(index: SplitIndex, files: list[int], wanted, studies_per_item: int) -> list[dict]:
    """Eval read units in file order: runs of whole row groups of one shard and the rows to keep.

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


def _read_item(item: dict, fs: pafs.FileSystem, columns: list[str]) -> pa.Table:
    """The study rows of one eval read unit: its row groups of one file, then the wanted rows."""
    with fs.open_input_file(item["path"]) as f:
        table = pq.ParquetFile(f).read_row_groups(item["row_groups"], columns=columns)
    return table.take(item["take"])


def eval_items(items: pa.Table, cfg: Config, fs: pafs.FileSystem, rows_per_batch: int) -> Iterator[dict[str, np.ndarray]]:
    """Map function: eval read units → eval rows (see :func:`samples.eval_batch`)."""
    transforms.limit_threads(cfg.data.num_cpus_per_map)
    for item in items.to_pylist():
        table = _read_item(item, fs, samples.READ_COLUMNS)
        for start in range(0, table.num_rows, rows_per_batch):
            yield samples.eval_batch(table.slice(start, rows_per_batch), cfg)


# ------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------


# Ray Data lets one execution buffer up to half the object store; while the next epoch is
# prefetched two executions of a rank overlap, so each train execution gets half of that.
STORE_FRACTION_WITH_PREFETCH = 0.25


DEFAULT_STORE_FRACTION = 0.5  # Ray Data's own default share of the object store for one execution
# Ranks sharing a node: an execution's budget holds this many blocks. What it holds beyond its
# budget is counted in blocks — one in each running task's generator, one pulled past the budget,
# one prefetched by the iterator — so at 3 blocks per budget those alone doubled it and 8 ranks
# (16 executions while prefetching) filled the store; at 8 they add < 1/2 of it.
BLOCKS_IN_BUDGET = 8
MIN_BLOCK = 256 * 1024  # a block still holds at least a row (a 384-px pair ≈ 0.3 MB)


def _item_dataset(cfg: Config, items: list[dict], fn, fn_kwargs: dict[str, Any], store_fraction: float | None = None,
                  local_ranks: int = 1):
    """One map task per item, in order: the read happens inside the task that decodes.

    Reading in the map task (instead of ``read_parquet`` → ``repartition`` → ``map_batches``) keeps
    shard bytes out of the object store and runs one operator, so Ray Data gives it every CPU and
    an epoch starts after one task hop instead of three (docs/pipeline.md, "Why one operator").

    Args:
        store_fraction: share of the object store this execution may buffer; None = Ray's default.
        local_ranks: training ranks whose executions share this node's object store: each gets
            ``1/local_ranks`` of the share and of the node's CPUs, blocks small enough that
            ``BLOCKS_IN_BUDGET`` fit in it (as for any execution), and one block per task generator.
    """
    import ray.data  # why: Ray loads where a dataset is built, not in map tasks that only transform

    _refresh_limits_sooner()
    fs, _ = storage.filesystem(cfg.data.shards, storage.StorageOptions.from_config(cfg.storage))
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))  # one item per block → per task
    block = cfg.data.block_mb * 1024**2
    map_args = _map_args(cfg)
    if local_ranks > 1:
        store_fraction = (store_fraction or DEFAULT_STORE_FRACTION) / local_ranks
    # Blocks small enough that the execution's floor (counted in blocks: generator buffers, the
    # executor's pull, the iterator's prefetch) fits its budget; on any real node block_mb wins.
    budget = (store_fraction or DEFAULT_STORE_FRACTION) * _node_store_bytes()
    block = max(MIN_BLOCK, min(block, int(budget / BLOCKS_IN_BUDGET)))
    if local_ranks > 1:
        map_args = _shared_node_map_args(cfg, map_args, local_ranks)
        # A running task may leave one finished block for the executor to pull, not Ray Data's 2:
        # each task's generator buffer is part of the execution's floor (docs/pipeline.md,
        # "Several ranks on one node").
        ds.context._max_num_blocks_in_streaming_gen_buffer = SHARED_GEN_BUFFER_BLOCKS
    # Bounds every object in the store: map tasks cut their output at this size.
    ds.context.target_max_block_size = block
    ds.context.override_object_store_memory_limit_fraction = store_fraction
    # Blocks in task order keep the consumer's reorder buffer at one block; the order itself is
    # checked on the consumer, so this is about memory, never about correctness.
    ds.context.execution_options.preserve_order = True
    return ds.map_batches(fn, batch_size=None, fn_kwargs={**fn_kwargs, "fs": fs}, **map_args)


# Blocks a running map task may have finished but not yet handed over, when ranks share a node.
SHARED_GEN_BUFFER_BLOCKS = 1


def _shared_node_map_args(cfg: Config, map_args: dict[str, Any], local_ranks: int) -> dict[str, Any]:
    """Map arguments of one of ``local_ranks`` executions sharing a node: its part of the CPUs.

    Every execution sees all the node's CPUs, so each would start as many map tasks as the node
    has CPUs, and each running task holds output blocks in the shared store. Capped at its
    part of the CPUs (at least one task), the node runs as many tasks as before, and an
    execution's store use stays near one task's worth. An explicit ``data.map_concurrency`` wins,
    and with ``data.map_resources`` the tasks run on other nodes, whose CPUs this one cannot tell.
    """
    import ray.data  # why: Ray loads where a dataset is built, not in map tasks that only transform

    if "compute" in map_args or cfg.data.map_resources:
        return map_args
    per_rank = _node_cpus() / (cfg.data.num_cpus_per_map * local_ranks)
    return {**map_args, "compute": ray.data.TaskPoolStrategy(size=max(1, int(per_rank)))}


def _node_resource(name: str) -> float:
    """Amount of a resource this process's node has (0 if none)."""
    import ray  # why: Ray loads where a dataset is built, not in map tasks that only transform

    me = ray.get_runtime_context().get_node_id()
    return float(next(n["Resources"].get(name, 0) for n in ray.nodes() if n["NodeID"] == me))


# Seconds between two refreshes of an execution's resource limits until they first arrive (Ray
# Data's own interval: 1 s). Ray Data 2.60 learns the CPUs and store an execution may use from its
# autoscaling coordinator actor, one asynchronous call per refresh, so the first refresh of every
# execution answers zero and the limits arrive one interval later. Until then every operator's
# budget is zero and only Ray's liveness rule runs a task (one, when nothing runs): the first
# second of every epoch ran one map task on a node with CPUs for more (docs/pipeline.md, "What held
# the second map task back"). Refreshing every 0.1 s until the limits are known makes that
# ≈ 0.1 s; after that Ray's own interval holds (each refresh costs the coordinator actor ≈ 3 ms:
# at 0.1 s throughout it used 0.54 CPU-s per 19 s epoch-loop). Limits, budgets and object-store
# bounds are unchanged.
LIMITS_REFRESH_S = 0.1


def _refresh_limits_sooner() -> None:
    """Ray Data's resource limits refresh every ``LIMITS_REFRESH_S`` until an execution has them (0 = leave as is).

    Wraps ``ResourceManager.get_global_limits`` (once per process; not a public API — a Ray without
    it, or without the interval attribute, is left alone): while an execution's CPU limit is zero its
    manager gets an instance attribute shadowing Ray's class-level interval; once non-zero, Ray's.
    It applies to every execution this process starts, the eval datasets included.
    """
    from ray.data._internal.execution import resource_manager  # why: as in _item_dataset

    manager = getattr(resource_manager, "ResourceManager", None)
    limits = getattr(manager, "get_global_limits", None)
    if not hasattr(manager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S") or limits is None or hasattr(limits, "ray_own"):
        return

    @functools.wraps(limits)
    def get_global_limits(self):
        known = getattr(self, "_global_limits", None)
        if LIMITS_REFRESH_S > 0 and (known is None or known.cpu == 0):
            self.GLOBAL_LIMITS_UPDATE_INTERVAL_S = LIMITS_REFRESH_S
        else:
            vars(self).pop("GLOBAL_LIMITS_UPDATE_INTERVAL_S", None)  # Ray's own from here on
        return limits(self)

    get_global_limits.ray_own = limits
    manager.get_global_limits = get_global_limits


def _node_store_bytes() -> int:
    """Object store capacity of this process's node."""
    return int(_node_resource("object_store_memory"))


def _node_cpus() -> float:
    """CPUs of this process's node."""
    return _node_resource("CPU")


def _map_args(cfg: Config) -> dict[str, Any]:
    import ray.data  # why: Ray loads where a dataset is built, not in map tasks that only transform

    args: dict[str, Any] = {"num_cpus": cfg.data.num_cpus_per_map, "batch_format": "pyarrow"}
    if cfg.data.map_concurrency > 0:  # `compute`, not `concurrency` (deprecated since Ray 2.51)
        args["compute"] = ray.data.TaskPoolStrategy(size=cfg.data.map_concurrency)
    if cfg.data.map_resources:
        args["resources"] = dict(cfg.data.map_resources)
    return args


def build_train_dataset(cfg: Config, epoch: int, rank: int = 0, world_size: int = 1,
                        skip_samples: int = 0, history: tuple[tuple[int, int, int, int], ...] = (),
                        local_ranks: int = 1):
    """Rank ``rank``'s training stream for ``epoch`` (blocks of samples in plan order).

    Use :class:`TrainStream` or :func:`iter_train_batches` to consume it; it is also the unit a
    benchmark times.

    Returns:
        ``(dataset, plan)``: a lazy ``ray.data.Dataset`` and the :class:`RankPlan` it follows.
    """
    plan = rank_plan(cfg, epoch, rank, world_size, skip_samples, history)
    items = window_items(split_index(cfg, "train"), plan)
    ds = _item_dataset(cfg, items, train_items, {"cfg": cfg, "epoch": epoch},
                       STORE_FRACTION_WITH_PREFETCH if cfg.data.prefetch_next_epoch else None, local_ranks)
    return ds, plan


def build_eval_dataset(cfg: Config, split: str):
    """One row per usable image of ``split``: eval transform, unmasked caption, labels.

    Columns: ``image`` uint8 3×S×S, ``input_ids``/``attention_mask`` int64 L, ``sep_mask`` bool L,
    ``density``/``birads`` int64 (−1 unknown), ``study_id``, ``image_id`` and the caption fields
    (strings, "" = unknown; ``eval_caption_fields`` turns a row back into CaptionFields for
    the zero-shot prompts). Rows come in shard order.
    """
    index = split_index(cfg, split)
    rows = cfg.data.map_batch_size
    items = _work_items(index, list(range(len(index.files))), lambda _: True, rows)
    return _item_dataset(cfg, items, eval_items, {"cfg": cfg, "rows_per_batch": rows})


def label_items(items: pa.Table, fs: pafs.FileSystem) -> Iterator[dict[str, np.ndarray]]:
    """Map function: eval read units → image ids and labels (:func:`samples.eval_labels`); the
    image bytes are neither read nor decoded."""
    for item in items.to_pylist():
        yield samples.eval_labels(_read_item(item, fs, samples.LABEL_COLUMNS))


def build_label_dataset(cfg: Config, split: str):
    """``image_id``, ``density``, ``birads`` of every usable image of ``split``, in shard order
    (the rows and values of :func:`build_eval_dataset` without its images, captions and tokens)."""
    index = split_index(cfg, split)
    items = _work_items(index, list(range(len(index.files))), lambda _: True, cfg.data.map_batch_size)
    return _item_dataset(cfg, items, label_items, {})


# ------------------------------------------------------------------------------------------
# Worker side: ordered micro-batches with data-wait accounting
# ------------------------------------------------------------------------------------------


TENSOR_KEYS = ("image1", "image2", "input_ids", "attention_mask", "sep_mask", "density", "birads",
               "sample_index", "epoch_position", "sample_id", "pair_same_image")


def collate(rows: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, Any]:
    """Rows (a numpy batch and a row index) → the batch dict (docs/architecture.md) of torch tensors and string lists.

    Rows that are consecutive rows of one batch (the map tasks cut their output on micro-batch
    boundaries) become slices of it, without a copy; others are stacked. ``image1``/``image2`` come
    out as B×3×S×S uint8: a broadcast view of the one gray channel (no copy; move ``image[:, :1]``
    to the device and expand there to send a third of the bytes).
    """
    import torch  # why: map tasks on CPU-only data nodes never load torch; only the consumer collates

    block, first = rows[0]
    if all(b is block for b, _ in rows) and rows[-1][1] - first == len(rows) - 1:
        columns = {key: block[key][first:first + len(rows)] for key in TENSOR_KEYS}
    else:
        columns = {key: np.stack([b[key][i] for b, i in rows]) for key in TENSOR_KEYS}
    out: dict[str, Any] = {}
    for key, array in columns.items():
        with warnings.catch_warnings():
            # A slice of a block still in the object store is read-only; torch warns that its tensor
            # would not be. Nothing writes into a batch's tensors (the model's first op on each makes
            # a new one), as in Ray's own iter_torch_batches.
            warnings.simplefilter("ignore", UserWarning)
            out[key] = torch.from_numpy(array)
    for key in ("image1", "image2"):
        out[key] = out[key].expand(-1, 3, -1, -1)  # B×1×S×S → B×3×S×S
    for key in samples.STRING_KEYS:
        out[key] = [str(b[key][i]) for b, i in rows]
    return out


def _in_order(blocks: Iterator[dict[str, np.ndarray]], start: int, stop: int, pending: dict | None = None):
    """Yield ``(batch, row)`` for sample indices start..stop-1 in order, whatever the arrival order.

    ``pending`` (the reorder buffer, sample index → row) may be passed in to watch its depth."""
    pending = {} if pending is None else pending
    expected = start
    for batch in blocks:
        for i, j in enumerate(batch["sample_index"]):
            assert int(j) not in pending and start <= int(j) < stop, f"sample {j} delivered twice or out of plan"
            pending[int(j)] = (batch, i)
        while expected in pending:
            yield pending.pop(expected)
            expected += 1
    assert expected == stop and not pending, f"stream ended at sample {expected} of {stop}"


def _blocks(dataset, prefetch_batches: int, detach: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """A dataset's output as numpy column dicts, one per record batch, as they come (the consumer orders them).

    Args:
        detach: copy each block's arrays out of the object store on arrival. Ray Data's numpy
            columns are views of the store object, which stays pinned while any row of it waits
            for its micro-batch (up to a micro-batch of rows per rank, plus queued blocks); a
            copy frees the store object at once and the rows wait in this process's heap.
    """
    blocks = dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=prefetch_batches)
    try:
        for table in blocks:
            for chunk in _numpy_chunks(table):
                yield _detached(chunk) if detach else chunk
    finally:
        # The consumer stops at the plan's last sample without asking for one more block, so
        # Ray's iterator would stop its prefetch threads only when garbage-collected; one left
        # running past ray.shutdown() kills the process ("core worker has already been shutdown").
        getattr(blocks, "close", lambda: None)()


def _numpy_chunks(table: pa.Table) -> Iterator[dict[str, np.ndarray]]:
    """A block's record batches as numpy column dicts, each a view of the block (no copy).

    A block joins several of a map task's output batches (up to the target block size), so its
    columns have several chunks, and Ray Data's numpy format concatenates them: one more copy of
    every image in the training process before :func:`collate` (≈ 0.14 CPU-s per 384 pairs of
    518 px, docs/benchmarks.md). Each record batch alone converts without one.
    """
    from ray.data.block import BlockAccessor  # why: as in _item_dataset

    for batch in table.to_batches():
        if batch.num_rows:
            yield BlockAccessor.for_block(pa.Table.from_batches([batch])).to_numpy()


def _detached(block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The block with every column copied into this process's memory (no view of the store left)."""
    return {k: np.array(v, copy=True) for k, v in block.items()}


class BlockStream:
    """A dataset's blocks pulled on a background thread into a bounded queue.

    Used to start the next epoch's execution while the trainer still consumes this epoch, so the
    startup of a Ray Data execution (planning, first tasks, the first window) overlaps
    training instead of stalling it. At most ``depth`` blocks wait in the queue; Ray Data's own
    backpressure bounds the rest.
    """

    _END = object()

    def __init__(self, dataset, prefetch_batches: int, depth: int, detach: bool = False):
        """``detach``: queue copies of the blocks, not views of the store (see :func:`_blocks`)."""
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pull, args=(dataset, prefetch_batches, detach),
                                        name="mama-next-epoch", daemon=True)
        self._thread.start()

    def _pull(self, dataset, prefetch_batches: int, detach: bool) -> None:
        iter_blocks = dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=prefetch_batches)
        blocks = (chunk for table in iter_blocks for chunk in _numpy_chunks(table))
        if detach:
            blocks = map(_detached, blocks)
        try:
            for block in blocks:
                if not self._put(block):
                    return
            self._put(self._END)
        except Exception as e:  # handed to the consumer, raised there
            self._put(e)
        finally:
            getattr(iter_blocks, "close", lambda: None)()  # stops the execution if it is still running

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


# Share of an epoch's samples received before the next epoch starts: early enough to hide its
# start behind the rest of this epoch, late enough that the two executions overlap only briefly
# (each holds its own share of the object store; at one half, the bounded-memory test spilled).
PREFETCH_AT = 0.75


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
                 drop_last: bool = True, on_most_received=None, monitor=None, detach: bool = False):
        """``dataset``: a ``ray.data.Dataset`` or a :class:`BlockStream`; ``on_most_received()`` runs
        once ``PREFETCH_AT`` of the samples have arrived; ``monitor``: a
        :class:`mama_ray.monitoring.DataMonitor` told of every batch; ``detach``: copy blocks out
        of the object store on arrival (see :func:`_blocks`)."""
        self._detach = detach
        self.plan = plan
        self.prefetched = isinstance(dataset, BlockStream)
        self.wait_seconds = 0.0
        self.last_wait = 0.0
        self.monitor, self._pending = monitor, {}
        remaining = plan.num_samples - plan.skip
        self.num_batches = remaining // micro_batch_size if drop_last else -(-remaining // micro_batch_size)
        self._batches = self._generate(dataset, micro_batch_size, prefetch_batches, drop_last, on_most_received)

    def _generate(self, dataset, micro_batch_size: int, prefetch_batches: int, drop_last: bool, on_most_received):
        source = iter(dataset) if self.prefetched else _blocks(dataset, prefetch_batches, self._detach)
        rows = []
        blocks = _on_most_received(source, self.plan.num_samples - self.plan.skip, on_most_received)
        try:
            for row in _in_order(blocks, self.plan.skip, self.plan.num_samples, self._pending):
                rows.append(row)
                if len(rows) == micro_batch_size:
                    yield collate(rows)
                    rows = []
            if rows and not drop_last:
                yield collate(rows)
        finally:
            source.close()  # the execution's threads stop now (see _blocks)

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            batch = next(self._batches)
        finally:
            self.last_wait = time.perf_counter() - start
            self.wait_seconds += self.last_wait
        if self.monitor is not None:
            self.monitor.batch(len(batch["sample_index"]), self.last_wait, len(self._pending))
        return batch


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


class TrainStream:
    """One rank's training epochs; it owns the execution started in advance for the next epoch.

    ``epoch(e)`` returns the micro-batches of epoch ``e``. With ``data.prefetch_next_epoch`` the
    execution of epoch ``e + 1`` starts once 3/4 of epoch ``e``'s samples have arrived; asking
    next for exactly that epoch from its start continues it, asking for anything else drops it.
    The samples are the same either way. Call :meth:`close` before ``ray.shutdown()`` in a
    process that ran whole epochs (the prefetch would be cut off mid-task).
    """

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1, local_ranks: int = 1):
        """``local_ranks``: ranks on this node, whose executions share its object store."""
        self.cfg, self.rank, self.world_size, self.local_ranks = cfg, rank, world_size, local_ranks
        self._next: tuple[int, BlockStream, RankPlan] | None = None

    def epoch(self, epoch: int, skip_samples: int = 0, history: tuple[tuple[int, int, int, int], ...] = (),
              drop_last: bool = True, prefetch_next: bool | None = None) -> TrainBatches:
        """This rank's micro-batches of ``epoch`` (see :func:`iter_train_batches` for the arguments).

        Args:
            prefetch_next: start epoch + 1 in advance; None = ``data.prefetch_next_epoch``.
        """
        taken = self._take(epoch, skip_samples, history)
        source, plan = taken or build_train_dataset(self.cfg, epoch, self.rank, self.world_size,
                                                    skip_samples, history, self.local_ranks)
        ahead = self.cfg.data.prefetch_next_epoch if prefetch_next is None else prefetch_next
        then = functools.partial(self._prefetch, epoch + 1) if ahead else None
        return TrainBatches(source, plan, self.cfg.train.micro_batch_size, self._store_prefetch(), drop_last, then,
                            monitor=DataMonitor(self.cfg.run.name, self.rank, epoch), detach=self._shared)

    @property
    def _shared(self) -> bool:
        """Whether other ranks' executions share this node's object store."""
        return self.local_ranks > 1

    def _store_prefetch(self) -> int:
        """Blocks Ray Data's iterator prefetches in the store: at most one when ranks share a node."""
        return min(1, self.cfg.data.prefetch_batches) if self._shared else self.cfg.data.prefetch_batches

    def _prefetch(self, epoch: int) -> None:
        self.close(0.0)
        dataset, plan = build_train_dataset(self.cfg, epoch, self.rank, self.world_size, local_ranks=self.local_ranks)
        # Shared node: the queue holds heap copies, so it keeps the configured depth.
        stream = BlockStream(dataset, self._store_prefetch(), self.cfg.data.prefetch_batches, detach=self._shared)
        self._next = (epoch, stream, plan)

    def _take(self, epoch: int, skip_samples: int, history: tuple) -> tuple[BlockStream, RankPlan] | None:
        nxt, self._next = self._next, None
        if nxt is not None and nxt[0] == epoch and skip_samples == 0 and not history:
            return nxt[1], nxt[2]
        if nxt is not None:
            nxt[1].cancel()
        return None

    def close(self, wait_s: float = 60.0) -> None:
        """Drop the prefetched next epoch, if any, and wait up to ``wait_s`` until its execution stopped."""
        nxt, self._next = self._next, None
        if nxt is not None:
            nxt[1].cancel(wait_s)


def iter_train_batches(cfg: Config, epoch: int, rank: int = 0, world_size: int = 1,
                       skip_samples: int = 0, drop_last: bool = True,
                       history: tuple[tuple[int, int, int, int], ...] = ()) -> TrainBatches:
    """Rank ``rank``'s micro-batches of ``epoch`` in the plan's order (one epoch, nothing prefetched).

    A training rank uses :class:`TrainStream` instead, which starts each next epoch in advance.

    Args:
        cfg: the run config (``run.seed``, ``data.*``, ``text.*``, ``train.micro_batch_size``,
            ``train.grad_accum``).
        epoch: epoch number (0-based); the order and all augmentations depend on it.
        rank, world_size: this worker's place (``ray.train.get_context()``).
        skip_samples: samples of this epoch (segment) this rank already consumed (resume); the
            iterator yields exactly the rest. A multiple of the micro-batch size keeps batches aligned.
        drop_last: drop a last partial micro-batch (the same count on every rank either way).
        history: ``(world size, samples per rank, micro-batch, grad_accum)`` of earlier segments of
            this epoch run at another world size (elastic resume); this call plans what they left
            among ``world_size`` ranks, and ``skip_samples`` counts within that new segment.
    Returns:
        A :class:`TrainBatches` yielding dicts with ``image1``/``image2`` uint8 B×3×S×S,
        ``input_ids``/``attention_mask`` int64 B×L, ``sep_mask`` bool B×L, ``density``/``birads``
        int64 (−1 unknown), ``sample_index``/``epoch_position``/``sample_id`` int64,
        ``pair_same_image`` bool, and lists ``study_id``, ``image_id``, ``image2_id``, ``caption``.
    """
    return TrainStream(cfg, rank, world_size).epoch(epoch, skip_samples, history, drop_last, prefetch_next=False)
