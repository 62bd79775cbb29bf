"""Per-sample work of the pipeline: labels and captions of a shard row, pairing, transforms, tokens.

Runs inside Ray Data map tasks (possibly on CPU-only nodes) and, for a handful of rows, in the
driver (evaluation). Nothing here knows about ranks or epochs beyond the sample's own random
stream, drawn from ``(run.seed, epoch, q)`` with ``q`` the image's number in the split's index.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyarrow as pa

from mama_ray.config import Config
from mama_ray.data import captions, transforms
from mama_ray.data.schema import IMAGE_STRUCT
from mama_ray.data.shards import decode_image

READ_COLUMNS = ["study_id", "split", "procedure", "reason", "age", "race", "ethnicity", "images"]
# What the labels of the eval rows need: every column but the images' bytes (nested field paths).
LABEL_COLUMNS = [*READ_COLUMNS[:-1], *(f"images.list.element.{f}" for f in IMAGE_STRUCT.names if f != "image")]

# The caption fields, listed once: CaptionFields' own fields. These come from the study row, the
# others from the image; eval rows name two of them differently, because their `density` and
# `birads` columns hold the classes.
CAPTION_FIELDS = tuple(f.name for f in dataclasses.fields(captions.CaptionFields))
STUDY_CAPTION_FIELDS = ("procedure", "reason", "age", "race", "ethnicity")
EVAL_RENAMED = {"density": "density_code", "birads": "birads_letter"}
EVAL_FIELDS = tuple(EVAL_RENAMED.get(f, f) for f in CAPTION_FIELDS)  # caption columns of an eval row
INT_CAPTION_FIELDS = ("age", "density")  # the others are strings
STRING_KEYS = ("caption", "study_id", "image_id", "image2_id")


# ------------------------------------------------------------------------------------------
# Labels and captions from a shard row
# ------------------------------------------------------------------------------------------


def caption_fields_from_study(study: dict[str, Any], image: dict[str, Any]) -> captions.CaptionFields:
    """The caption fields of one image of a study row (docs/architecture.md, shard schema)."""
    return captions.CaptionFields(**{f: (study if f in STUDY_CAPTION_FIELDS else image).get(f)
                                     for f in CAPTION_FIELDS})


def usable_images(study: dict[str, Any]) -> list[int]:
    """Indices of a study's images with a complete caption (the only ones the method uses)."""
    return [i for i, img in enumerate(study.get("images") or [])
            if captions.is_complete(caption_fields_from_study(study, img))]


def density_class(density: int | None) -> int:
    """tissueden 1–4 → class 0–3; male (5) or unknown → −1 (method.md §1.7)."""
    return int(density) - 1 if density in (1, 2, 3, 4) else -1


def birads_class(letter: str | None) -> int:
    """BI-RADS letter → index in ``ANBPSMK``; unknown → −1."""
    return captions.BIRADS_LETTERS.index(letter) if letter and letter in captions.BIRADS_LETTERS else -1


def eval_field_values(f: captions.CaptionFields) -> dict[str, Any]:
    """CaptionFields → the caption columns of an eval row (see :data:`EVAL_FIELDS`)."""
    return {EVAL_RENAMED.get(name, name): getattr(f, name) for name in CAPTION_FIELDS}


def eval_caption_fields(row: dict[str, Any]) -> captions.CaptionFields:
    """An eval row (from ``build_eval_dataset``) → its unmasked :class:`CaptionFields`."""
    values = {}
    for name in CAPTION_FIELDS:
        value = str(row[EVAL_RENAMED.get(name, name)]) or None
        values[name] = int(value) if value is not None and name in INT_CAPTION_FIELDS else value
    return captions.CaptionFields(**values)


_TOKENIZERS: dict[str, Any] = {}  # one per process and tokenizer URI: map tasks reuse processes


def caption_tokens(cfg: Config, texts: list[str]) -> dict[str, np.ndarray]:
    """Model texts → ``input_ids``/``attention_mask`` int64 B×L and ``sep_mask`` bool B×L."""
    # why: transformers loads in the processes that tokenise (map tasks), not in every importer of samples
    from mama_ray.data.tokenizer import load_tokenizer, token_arrays

    if not texts:
        return {"input_ids": np.zeros((0, cfg.text.max_len), np.int64),
                "attention_mask": np.zeros((0, cfg.text.max_len), np.int64),
                "sep_mask": np.zeros((0, cfg.text.max_len), bool)}
    if cfg.text.tokenizer not in _TOKENIZERS:
        _TOKENIZERS[cfg.text.tokenizer] = load_tokenizer(cfg)
    return token_arrays(_TOKENIZERS[cfg.text.tokenizer], texts, cfg.text.max_len)


# ------------------------------------------------------------------------------------------
# Training samples
# ------------------------------------------------------------------------------------------


def sample_rng(seed: int, epoch: int, q: int) -> np.random.Generator:
    """The random stream of sample ``q`` in ``epoch``: the same whatever the rank or world size."""
    return np.random.default_rng([int(seed), int(epoch), int(q), 0])


def _second_image(rng: np.random.Generator, usable: list[int], first: int, prob: float) -> int:
    """method.md §1.5: another usable image of the study with probability ``prob``, else the same one."""
    others = [i for i in usable if i != first]
    if rng.random() < prob and others:
        return others[int(rng.integers(len(others)))]
    return first


class BaseViews:
    """The :func:`~mama_ray.data.transforms.base_view` of each image a map task uses, computed once.

    A window's pairs draw their second image from the same study (x², method.md §1.5), so without
    reuse a task decodes and resizes ≈ 1 + ``second_view_prob`` images per pair; with it, one per
    image. Holds at most ``budget_bytes`` of views (past that, a view is computed each time it is
    asked for); :meth:`release` drops a study's views once the task has emitted its last sample.
    """

    def __init__(self, size: int, budget_bytes: int):
        self.size, self.budget = size, budget_bytes
        self.views: dict[tuple, np.ndarray] = {}
        self.held = 0
        self.computed = 0  # views computed (decode + crop + resize), for tests and benchmarks

    def get(self, key: tuple, image: dict[str, Any]) -> np.ndarray:
        """The base view of ``image`` (a shard image struct), known to this cache as ``key``."""
        view = self.views.get(key)
        if view is None:
            view = transforms.base_view(decode_image(image["image"], image["codec"]), self.size)
            self.computed += 1
            if self.held + view.nbytes <= self.budget:
                self.views[key], self.held = view, self.held + view.nbytes
        return view

    def release(self, prefix: tuple) -> None:
        """Drop every view whose key starts with ``prefix`` (one study's)."""
        for key in [k for k in self.views if k[: len(prefix)] == prefix]:
            self.held -= self.views.pop(key).nbytes


def train_sample(cfg: Config, study: dict, slot: int, epoch: int, q: int,
                 views: BaseViews | None = None, key: tuple = ()) -> dict:
    """Training sample of the ``slot``-th usable image of ``study``, all randomness from ``(seed, epoch, q)``.

    ``views``/``key``: take the base views of the study's images from that cache, as ``key + (i,)``
    for image ``i`` (the same sample, bit for bit, with less work when images repeat).
    """
    rng = sample_rng(cfg.run.seed, epoch, q)
    usable = usable_images(study)
    i1 = usable[slot]
    i2 = _second_image(rng, usable, i1, cfg.data.second_view_prob)
    masked = captions.sample_masked(rng, cfg.text.mask_meta)
    img1, img2 = study["images"][i1], study["images"][i2]
    size = cfg.data.image_size
    views = views if views is not None else BaseViews(size, 0)  # no reuse beyond this pair
    base1 = views.get((*key, i1), img1)
    base2 = base1 if i2 == i1 else views.get((*key, i2), img2)
    if cfg.data.augment:
        view1, view2 = transforms.augment(base1, size, rng), transforms.augment(base2, size, rng)
    else:
        view1, view2 = base1, base2
    text = captions.caption_text(caption_fields_from_study(study, img1), masked)
    return {"image1": view1[None], "image2": view2[None], "caption": text,
            "density": density_class(img1["density"]), "birads": birads_class(img1["birads"]),
            "study_id": study["study_id"], "image_id": img1["image_id"], "image2_id": img2["image_id"],
            "pair_same_image": i1 == i2}


TRAIN_DTYPES = {"density": np.int64, "birads": np.int64, "pair_same_image": bool, "sample_index": np.int64,
                "epoch_position": np.int64, "sample_id": np.int64}


def train_columns(cfg: Config, samples: list[dict]) -> dict[str, np.ndarray]:
    """Training samples (dicts of :func:`train_sample` plus the plan's int keys) → column arrays.

    Every block has the same columns and dtypes, also an empty one.
    """
    size = cfg.data.image_size
    out = {key: np.stack([s[key] for s in samples]) if samples else np.zeros((0, 1, size, size), np.uint8)
           for key in ("image1", "image2")}
    for key in STRING_KEYS:
        out[key] = np.array([s[key] for s in samples], dtype=str)
    for key, dtype in TRAIN_DTYPES.items():
        out[key] = np.array([s[key] for s in samples], dtype=dtype)
    return {**out, **caption_tokens(cfg, [captions.to_model_text(s["caption"]) for s in samples])}


# ------------------------------------------------------------------------------------------
# Evaluation rows
# ------------------------------------------------------------------------------------------


def eval_batch(batch: pa.Table, cfg: Config) -> dict[str, np.ndarray]:
    """Study rows → one eval row per usable image (eval transform, no masking).

    Columns: ``image`` uint8 N×3×S×S, ``study_id``, ``image_id``, the caption fields
    (:data:`EVAL_FIELDS`, strings, "" = unknown), ``density``/``birads`` int64 classes and the tokens.
    """
    size, rows, texts = cfg.data.image_size, [], []
    for study in batch.to_pylist():
        for i in usable_images(study):
            img = study["images"][i]
            f = caption_fields_from_study(study, img)
            pixels = transforms.eval_transform(decode_image(img["image"], img["codec"]), size)
            texts.append(captions.to_model_text(captions.caption_text(f)))
            rows.append({"image": transforms.to_rgb_chw(pixels), "study_id": study["study_id"],
                         "image_id": img["image_id"], "density": density_class(f.density),
                         "birads": birads_class(f.birads), **eval_field_values(f)})
    out = {"image": np.stack([r["image"] for r in rows]) if rows else np.zeros((0, 3, size, size), np.uint8)}
    for key in ("study_id", "image_id", *EVAL_FIELDS):
        out[key] = np.array([("" if r[key] is None else str(r[key])) for r in rows], dtype=str)
    out["density"] = np.array([r["density"] for r in rows], np.int64)
    out["birads"] = np.array([r["birads"] for r in rows], np.int64)
    return {**out, **caption_tokens(cfg, texts)}


def eval_labels(batch: pa.Table) -> dict[str, np.ndarray]:
    """Study rows (:data:`LABEL_COLUMNS` suffice) → ``image_id``, ``density``, ``birads`` of each
    usable image, in :func:`eval_batch`'s order and classes; no image is decoded."""
    ids, density, birads = [], [], []
    for study in batch.to_pylist():
        for i in usable_images(study):
            img = study["images"][i]
            f = caption_fields_from_study(study, img)
            ids.append("" if img["image_id"] is None else str(img["image_id"]))
            density.append(density_class(f.density))
            birads.append(birads_class(f.birads))
    return {"image_id": np.array(ids, dtype=str), "density": np.array(density, np.int64),
            "birads": np.array(birads, np.int64)}
