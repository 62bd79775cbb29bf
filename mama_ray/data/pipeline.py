"""The Ray Data training and evaluation pipeline: shards → paired, captioned, augmented, tokenised samples.

Split by concern (design and costs in ``docs/pipeline.md``):

* :mod:`mama_ray.data.plan` — the split's index and the epoch plan (which rank reads which row
  groups, in which order it emits their samples; exact and elastic resume);
* :mod:`mama_ray.data.samples` — per-sample work: labels, captions, pairing, transforms, tokens;
* :mod:`mama_ray.data.stream` — the Ray Data datasets, the ordered stream a rank consumes and the
  next epoch started in advance (:class:`~mama_ray.data.stream.TrainStream`).

This module re-exports their public names, so ``from mama_ray.data.pipeline import …`` keeps working.
"""

from __future__ import annotations

from mama_ray.data.plan import (
    FlatIndex,
    PlanParams,
    RankPlan,
    SplitIndex,
    Window,
    epoch_plan,
    rank_plan,
    samples_per_rank,
    shard_paths,
    split_index,
)
from mama_ray.data.samples import (
    CAPTION_FIELDS,
    EVAL_FIELDS,
    READ_COLUMNS,
    STRING_KEYS,
    birads_class,
    caption_fields_from_study,
    caption_tokens,
    density_class,
    eval_batch,
    eval_caption_fields,
    train_columns,
    train_sample,
    usable_images,
)
from mama_ray.data.stream import (
    TENSOR_KEYS,
    BlockStream,
    TrainBatches,
    TrainStream,
    build_eval_dataset,
    build_label_dataset,
    build_train_dataset,
    collate,
    iter_train_batches,
)

__all__ = [
    "CAPTION_FIELDS", "EVAL_FIELDS", "READ_COLUMNS", "STRING_KEYS", "TENSOR_KEYS", "BlockStream",
    "FlatIndex", "PlanParams", "RankPlan", "SplitIndex", "TrainBatches", "TrainStream", "Window",
    "birads_class", "build_eval_dataset", "build_label_dataset", "build_train_dataset", "caption_fields_from_study", "collate",
    "density_class", "epoch_plan", "eval_batch", "eval_caption_fields", "iter_train_batches",
    "rank_plan", "samples_per_rank", "shard_paths", "split_index", "caption_tokens", "train_columns",
    "train_sample", "usable_images",
]
