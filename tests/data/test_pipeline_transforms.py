"""Image transforms of method.md §1.6: Otsu crop, random resized crop, jitter, determinism."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from mama_ray.data import transforms


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_otsu_crop_finds_the_bright_rectangle():
    img = np.full((40, 30), 10, np.uint8)
    img[5:25, 12:28] = 200  # rows 5..24, cols 12..27
    out = transforms.otsu_crop(img)
    assert out.shape == (20, 16)
    assert (out == 200).all()


def test_otsu_crop_keeps_a_flat_image_whole():
    img = np.full((12, 9), 0, np.uint8)
    assert transforms.otsu_crop(img).shape == (12, 9)


def _nonzero_box_crop(img):
    """The ingest's former crop (np.nonzero box of the Otsu mask), kept here as the reference."""
    _, mask = cv2.threshold(img, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    ys, xs = np.nonzero(mask)
    return img if ys.size == 0 else img[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]


def test_one_otsu_crop_serves_ingest_and_transforms():
    """Ingest (dicom.pixels) and the view transforms crop with one function, bit for bit as before."""
    from mama_ray.dicom import pixels

    assert transforms.otsu_crop is pixels.otsu_crop
    rng = _rng(3)
    img = rng.integers(0, 30, (50, 40)).astype(np.uint8)  # dark noisy background
    yy, xx = np.mgrid[:50, :40]
    img[((yy - 30) / 12) ** 2 + ((xx - 15) / 9) ** 2 <= 1] = 180  # an ellipse: rows 18..42, cols 6..24
    assert pixels.otsu_crop(img).shape == (25, 19)
    np.testing.assert_array_equal(pixels.otsu_crop(img), img[18:43, 6:25])
    for seed in range(20):  # random images, flat ones included: the same array as the old ingest crop
        r = _rng(seed)
        x = (r.integers(0, 256, (int(r.integers(1, 30)), int(r.integers(1, 30)))) * (seed % 5 != 0)).astype(np.uint8)
        np.testing.assert_array_equal(pixels.otsu_crop(x), _nonzero_box_crop(x))
    np.testing.assert_array_equal(transforms.eval_transform(img, 16), transforms.resize(img[18:43, 6:25], 16))


def test_transforms_reject_colour_images():
    with pytest.raises(ValueError, match="grayscale"):
        transforms.otsu_crop(np.zeros((4, 4, 3), np.uint8))


def test_crop_box_respects_scale_and_ratio():
    for seed in range(200):
        top, left, h, w = transforms.crop_box(_rng(seed), 100, 100)
        assert 0 <= top <= 100 - h and 0 <= left <= 100 - w
        # rounding of w and h moves the area/ratio by at most a pixel's worth
        assert 0.1 * 10000 * 0.9 <= h * w <= 10000
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_crop_box_falls_back_to_the_centre_for_impossible_shapes():
    # A 1×1000 strip admits no box with aspect 3/4–4/3 and ≥10 % of the area: centre crop.
    top, left, h, w = transforms.crop_box(_rng(1), 1, 1000)
    assert (h, w) == (1, round(4 / 3))
    assert (top, left) == (0, (1000 - w) // 2)


def test_color_jitter_on_a_flat_image_is_brightness_only():
    img = np.full((8, 8), 100, np.uint8)
    draws = _rng(5)
    draws.permutation(4)
    brightness = draws.uniform(0.2, 1.8)  # contrast around the mean leaves a flat image as it is
    out = transforms.color_jitter(img, _rng(5))
    assert (out == min(255, round(100 * brightness))).all()


def test_gaussian_blur_keeps_flat_images_and_smooths_an_impulse():
    flat = np.full((9, 9), 77, np.uint8)
    assert (transforms.gaussian_blur(flat, 1.5) == 77).all()
    impulse = np.zeros((9, 9), np.uint8)
    impulse[4, 4] = 255
    out = transforms.gaussian_blur(impulse, 1.0)
    g = np.exp(-(np.arange(-3, 4) ** 2) / 2.0)
    g /= g.sum()
    assert abs(int(out[4, 4]) - 255 * g[3] ** 2) <= 1  # the 7×7 kernel's centre weight


def test_train_transform_is_a_function_of_the_generator():
    img = _rng(0).integers(0, 255, (60, 40)).astype(np.uint8)
    a = transforms.train_transform(img, 32, _rng(3))
    b = transforms.train_transform(img, 32, _rng(3))
    c = transforms.train_transform(img, 32, _rng(4))
    assert a.shape == (32, 32) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_eval_transform_is_crop_then_resize_and_rgb_repeats_gray():
    img = np.zeros((50, 40), np.uint8)
    img[10:30, 5:25] = 180
    out = transforms.eval_transform(img, 16)
    assert out.shape == (16, 16) and (out == 180).all()
    rgb = transforms.to_rgb_chw(out)
    assert rgb.shape == (3, 16, 16) and all(np.array_equal(rgb[c], out) for c in range(3))


@pytest.mark.parametrize(("cpus", "threads"), [(1.0, 1), (2.0, 2), (2.5, 2), (0.5, 1)])
def test_limit_threads_gives_opencv_the_reserved_cpus(cpus, threads):
    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(4 if threads != 4 else 3)
        assert transforms.limit_threads(cpus) == threads
        assert cv2.getNumThreads() == threads
    finally:
        cv2.setNumThreads(before)


@pytest.mark.parametrize("fn", ["train_items", "eval_items"])
def test_map_functions_run_opencv_on_the_task_cpus(fn):
    """A map task that reserved one CPU leaves OpenCV one thread, whatever its default pool was."""
    import pyarrow as pa

    from mama_ray.config import load
    from mama_ray.data import stream

    cfg = load("tiny_cpu", {"data.num_cpus_per_map": 1.0})
    kwargs = {"epoch": 0} if fn == "train_items" else {"rows_per_batch": 4}
    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(3)
        assert list(getattr(stream, fn)(pa.table({"q": pa.array([], pa.int64())}), cfg, fs=None, **kwargs)) == []
        assert cv2.getNumThreads() == 1
    finally:
        cv2.setNumThreads(before)
