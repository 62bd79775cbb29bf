"""The PNGs decode, have a sensible size, are not blank and show what they were given."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from mama_ray.eval import plots


def _decode(png: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, "not a decodable PNG"
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return img


def test_confusion_png_is_non_trivial_and_depends_on_counts():
    names = ["A", "B", "C", "D"]
    a = _decode(plots.confusion_png(np.diag([5, 5, 5, 5]), names, "density"))
    b = _decode(plots.confusion_png(np.ones((4, 4), int) * 5, names, "density"))
    assert a.shape[0] > 150 and a.shape[1] > 150
    assert a.std() > 10
    assert a.shape != b.shape or np.abs(a.astype(int) - b).mean() > 1


def test_roc_png_draws_a_curve_per_present_class():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[y] * 0.8 + 0.1
    png = _decode(plots.roc_png(y, probs, ["x", "y", "z"], "roc"))
    assert png.std() > 10


def test_patch_heatmap_upsamples_in_grid_order():
    hm = plots.patch_heatmap(np.array([0.0, 0.0, 0.0, 1.0]), 40, 40)  # hot bottom-right patch
    assert hm.shape == (40, 40)
    assert hm[35, 35] == pytest.approx(1.0) and hm[5, 5] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="square"):
        plots.patch_heatmap(np.zeros(5), 10, 10)


def test_sentence_heatmaps_differ_per_sentence_map():
    rng = np.random.default_rng(0)
    image = (rng.random((3, 64, 64)) * 255).astype(np.uint8)
    left = np.tile([1.0, 1.0, 0.0, 0.0], 4).reshape(1, 16)  # 4×4 grid, left half hot
    right = 1.0 - left
    a = _decode(plots.sentence_heatmaps_png(image, np.concatenate([left, right]), ["s1", "s2"], "t"))
    b = _decode(plots.sentence_heatmaps_png(image, np.concatenate([right, left]), ["s1", "s2"], "t"))
    assert a.std() > 10 and a.shape == b.shape
    assert np.abs(a.astype(int) - b).mean() > 1
