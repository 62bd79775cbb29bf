"""Per-sample work (mama_ray/data/samples.py): the base-view cache gives the same samples with less work."""

from __future__ import annotations

import numpy as np
import pytest

from mama_ray.config import load
from mama_ray.data import samples, transforms
from mama_ray.data.shards import encode_image
from mama_ray.data.synthetic import synth_image

SIZE = 48


def _study(seed: int = 0) -> dict:
    """A shard row of four usable images (L/R × CC/MLO), PNG-encoded, 120 px long side."""
    rng = np.random.default_rng(seed)
    images = []
    for k, (side, view) in enumerate((("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO"))):
        img = (synth_image(rng, side, view, 2, "N")[::8, ::8] * 255).astype(np.uint8)
        images.append({"image_id": f"i{k}", "laterality": side, "view": view, "image": encode_image(img),
                       "codec": "png", "height": img.shape[0], "width": img.shape[1], "density": 2, "birads": "N"})
    return {"study_id": "s0", "patient_id": "p0", "split": "train", "procedure": "MG Screening Bilateral",
            "reason": "screening", "age": 55, "race": "White", "ethnicity": None, "images": images}


def _cfg(**data):
    return load("tiny_cpu", {"data.image_size": SIZE, **{f"data.{k}": v for k, v in data.items()}})


@pytest.fixture
def counted(monkeypatch):
    """Counts the base views computed (decode + Otsu crop + resize), through the real function."""
    calls = []
    real = transforms.base_view

    def base_view(img, size):
        calls.append(img.shape)
        return real(img, size)

    monkeypatch.setattr(transforms, "base_view", base_view)
    return calls


@pytest.mark.parametrize("augment", [True, False])
def test_shared_views_give_the_same_samples_and_compute_each_image_once(counted, augment):
    cfg, study = _cfg(augment=augment, second_view_prob=1.0), _study()
    plain = [samples.train_sample(cfg, study, slot, 3, 100 + slot) for slot in range(4)]
    # second_view_prob 1: every pair has two different images, so each pair computes two views
    assert len(counted) == 8 and not any(s["pair_same_image"] for s in plain)

    counted.clear()
    views = samples.BaseViews(SIZE, 2**20)
    shared = [samples.train_sample(cfg, study, slot, 3, 100 + slot, views, (0, 0)) for slot in range(4)]
    for a, b in zip(plain, shared, strict=True):
        assert a["image_id"] == b["image_id"] and a["image2_id"] == b["image2_id"] and a["caption"] == b["caption"]
        assert np.array_equal(a["image1"], b["image1"]) and np.array_equal(a["image2"], b["image2"])
    used = {s["image_id"] for s in shared} | {s["image2_id"] for s in shared}
    assert len(counted) == views.computed == len(used) == 4  # once per image, not once per use
    assert views.held == 4 * SIZE * SIZE  # four S×S uint8 views


def test_the_budget_bounds_what_is_kept_and_release_frees_a_study(counted):
    cfg, study = _cfg(second_view_prob=1.0), _study()
    views = samples.BaseViews(SIZE, SIZE * SIZE)  # room for exactly one view
    out = [samples.train_sample(cfg, study, slot, 3, 100 + slot, views, (0, 0)) for slot in range(4)]
    assert views.held == SIZE * SIZE and list(views.views) == [(0, 0, 0)]  # the first computed: slot 0's image
    uses_of_first = sum([s["image_id"], s["image2_id"]].count("i0") for s in out)
    assert uses_of_first >= 2 and len(counted) == 8 - (uses_of_first - 1)  # every other use computes again
    views.release((0, 1))  # another study: nothing of this one goes
    assert views.held == SIZE * SIZE
    views.release((0, 0))
    assert views.held == 0 and views.views == {}


def test_no_cache_budget_is_the_plain_per_sample_work(counted):
    cfg, study = _cfg(second_view_prob=1.0), _study()
    views = samples.BaseViews(SIZE, 0)
    for slot in range(4):
        samples.train_sample(cfg, study, slot, 3, 100 + slot, views, (0, 0))
    assert len(counted) == views.computed == 8 and views.held == 0
