"""The validation split as fixed, paired samples: each rank's share decoded once, reused at every validation.

What a rank evaluates (method.md §1.4–1.6 applied to the val split, all of it a function of the seed):

* **The samples.** The val split's usable images in index order (shard files sorted, rows, images)
  are numbered ``q = 0..N-1``; rank ``r`` of ``W`` owns the contiguous run ``q ∈ [r·n, (r+1)·n)``
  with ``n = N // W`` (the last ``N mod W < W`` images are left out so that every rank runs the
  same number of equally sized batches: the NT-Xent gathers across ranks). A contiguous run keeps
  each rank's reads to its own part of the shards (val studies are spread thinly over every row
  group, so an interleaved split would make every rank read almost every row group).
* **The pairs (method.md §1.5).** ``x²`` is another usable image of the same study with probability
  ``data.second_view_prob``, else ``x¹`` itself, drawn from ``(run.seed, VAL_SALT, q)``.
* **Images and captions.** The eval transform (method.md §1.6) for both views, the caption **unmasked**
  (method.md §1.4: val captions are never masked).
* **The batches.** The rank's ``n`` samples in a permutation fixed by ``(run.seed, VAL_SALT, r)``
  (batches then mix studies, as the training stream does, instead of holding a study's near-identical
  captions as each other's negatives), cut into ``train.micro_batch_size`` batches, the last one
  smaller (the same size on every rank).

The first call decodes the rank's share with a thread pool (OpenCV releases the GIL) into a
NumPy memory-mapped file in a temporary folder (``U×S×S`` uint8 for the ``U`` distinct images: a
rank's n samples plus partners; ≈ n·S² bytes: 2.4 GB at EMBED's 36k val images, 4 ranks,
S = 518) and every later validation reads that file: decoding happens once per worker process,
not once per validation.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from mama_ray import storage
from mama_ray.config import Config
from mama_ray.data import captions, transforms
from mama_ray.data.pipeline import (
    birads_class,
    caption_fields_from_study,
    caption_tokens,
    density_class,
    shard_paths,
    split_index,
    usable_images,
)
from mama_ray.data.shards import decode_image, read_rows

VAL_SALT = 3  # separates the val split's random streams from the training epochs'
COLUMNS = ["study_id", "split", "procedure", "reason", "age", "race", "ethnicity", "images"]


@dataclass(frozen=True)
class _Owned:
    """Where rank's samples live: per file, the rows to read and the (slot, q) of each row's samples."""

    files: tuple[str, ...]
    rows: dict[int, dict[int, list[tuple[int, int]]]]  # file → row → [(usable slot, q)]
    groups: tuple[tuple[int, ...], ...]  # rows per row group, per file


def rank_share(cfg: Config, rank: int, world_size: int) -> tuple[range, _Owned]:
    """The global sample numbers ``q`` rank ``rank`` owns and the shard rows that hold them."""
    index = split_index(cfg, "val")
    n = index.num_samples // world_size
    if n == 0:
        raise ValueError(f"{world_size} ranks but only {index.num_samples} validation images "
                         "(set train.val_every=0 to train without validation)")
    mine = range(rank * n, (rank + 1) * n)
    rows: dict[int, dict[int, list[tuple[int, int]]]] = {}
    q = 0
    for f in range(len(index.files)):
        for count, row in zip(index.counts[f], index.rows[f], strict=True):
            for slot in range(int(count)):
                if q in mine:
                    rows.setdefault(f, {}).setdefault(int(row), []).append((slot, q))
                q += 1
    return mine, _Owned(index.files, rows, index.row_groups)


def second_image(rng: np.random.Generator, usable: list[int], first: int, prob: float) -> int:
    """method.md §1.5: another usable image of the study with probability ``prob``, else the same one."""
    others = [i for i in usable if i != first]
    if rng.random() < prob and others:
        return others[int(rng.integers(len(others)))]
    return first


@dataclass
class _Sample:
    q: int
    key1: tuple[str, int]  # (study id, image index in the study)
    key2: tuple[str, int]
    fields: captions.CaptionFields
    image_id: str
    image2_id: str
    study_id: str


def _decode(image: dict, size: int) -> np.ndarray:
    return transforms.eval_transform(decode_image(image["image"], image["codec"]), size)  # S×S


def _study_samples(cfg: Config, study: dict, owned: list[tuple[int, int]]) -> list[_Sample]:
    usable = usable_images(study)
    out = []
    for slot, q in owned:
        i1 = usable[slot]
        i2 = second_image(np.random.default_rng([cfg.run.seed, VAL_SALT, q]), usable, i1, cfg.data.second_view_prob)
        sid = study["study_id"]
        images = study["images"]
        out.append(_Sample(q, (sid, i1), (sid, i2), caption_fields_from_study(study, images[i1]),
                           images[i1]["image_id"], images[i2]["image_id"], sid))
    return out


_BUILT_ATTRS = ("images", "pairs", "tokens", "density", "birads", "fields", "image_ids", "image2_ids",
                "study_ids", "order")


class ValSet:
    """One rank's validation samples (see the module doc); :meth:`batches` yields them.

    Attributes (decoded on first use):
        num_samples: the rank's samples (the same on every rank).
        fields: per sample (in the order of the ``index`` column of the batches), its unmasked
            caption fields (the zero-shot prompts are built from them).
        image_ids, image2_ids, study_ids: per sample, the ids of x¹, x² and the study.
    """

    def __init__(self, cfg: Config, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self._built = False

    def _build(self) -> None:
        cfg, size = self.cfg, self.cfg.data.image_size
        mine, owned = rank_share(cfg, self.rank, self.world_size)
        fs, _ = shard_paths(cfg.data.shards, storage.StorageOptions.from_config(cfg.storage))
        self._dir = tempfile.mkdtemp(prefix=f"mama-val-r{self.rank}-")
        # At most two distinct images per sample; the file stays sparse beyond what is written.
        images = np.lib.format.open_memmap(os.path.join(self._dir, "images.npy"), mode="w+",
                                           dtype=np.uint8, shape=(2 * len(mine), size, size))  # ≤2n×S×S
        slot: dict[tuple[str, int], int] = {}
        samples: list[_Sample] = []
        with ThreadPoolExecutor(max(1, int(cfg.scaling.cpus_per_worker))) as pool:
            for f, rows in sorted(owned.rows.items()):  # one shard's rows in memory at a time
                order = sorted(rows)
                studies = read_rows(fs, owned.files[f], owned.groups[f], order, COLUMNS).to_pylist()
                new = []
                for row, study in zip(order, studies, strict=True):
                    for s in _study_samples(cfg, study, rows[row]):
                        samples.append(s)
                        for key in (s.key1, s.key2):
                            if key not in slot:
                                slot[key] = len(slot)
                                new.append((slot[key], study["images"][key[1]]))
                list(pool.map(lambda item: images.__setitem__(item[0], _decode(item[1], size)), new))
        assert [s.q for s in samples] == list(mine), "validation samples out of order"
        images.flush()
        self.images = images
        self._index(samples, slot)
        self._built = True

    def _index(self, samples: list[_Sample], slot: dict[tuple[str, int], int]) -> None:
        """Pairs, tokens, labels and the batch order of the decoded samples."""
        self.pairs = np.array([(slot[s.key1], slot[s.key2]) for s in samples], np.int64)  # n×2
        texts = [captions.to_model_text(captions.caption_text(s.fields)) for s in samples]
        self.tokens = caption_tokens(self.cfg, texts)  # input_ids / attention_mask / sep_mask, n×L
        self.density = np.array([density_class(s.fields.density) for s in samples], np.int64)
        self.birads = np.array([birads_class(s.fields.birads) for s in samples], np.int64)
        self.fields = [s.fields for s in samples]
        self.image_ids = [s.image_id for s in samples]
        self.study_ids = [s.study_id for s in samples]
        self.image2_ids = [s.image2_id for s in samples]
        self.order = np.random.default_rng([self.cfg.run.seed, VAL_SALT, self.rank]).permutation(len(samples))

    def __getattr__(self, name: str):
        # The decoded share and its index exist after the first use (the first validation), not
        # when a worker starts: a run with validation off, or one that crashes early, decodes nothing.
        if name in _BUILT_ATTRS and not self.__dict__.get("_built"):
            self._build()
            return getattr(self, name)
        raise AttributeError(name)

    @property
    def num_samples(self) -> int:
        return len(self.pairs)

    def batches(self) -> Iterator[dict[str, Any]]:
        """The rank's validation batches (same count and sizes on every rank).

        Yields dicts with ``image1``/``image2`` uint8 B×3×S×S, ``input_ids``/``attention_mask``
        int64 B×L, ``sep_mask`` bool B×L, ``density``/``birads`` int64 B (−1 unknown) and
        ``index`` int64 B (the samples' positions in :attr:`fields`).
        """
        import torch  # why: the data package loads torch only where it makes tensors (here, stream.collate)

        b = self.cfg.train.micro_batch_size
        for start in range(0, self.num_samples, b):
            idx = np.sort(self.order[start:start + b])  # sorted: the memory map reads forward
            batch = {k: torch.from_numpy(v[idx]) for k, v in self.tokens.items()}
            for view in (0, 1):
                img = torch.from_numpy(np.ascontiguousarray(self.images[self.pairs[idx, view]]))  # B×S×S
                batch[f"image{view + 1}"] = img[:, None].expand(-1, 3, -1, -1)
            batch.update(density=torch.from_numpy(self.density[idx]), birads=torch.from_numpy(self.birads[idx]),
                         index=torch.from_numpy(idx))
            yield batch

    def close(self) -> None:
        """Delete the decoded images (also done when the process exits normally)."""
        if self._built:
            del self.images
            shutil.rmtree(self._dir, ignore_errors=True)
            self._built = False

    def __del__(self) -> None:
        self.close()

