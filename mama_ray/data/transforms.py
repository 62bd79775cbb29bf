"""Image transforms of method.md §1.6 with numpy/OpenCV, driven by an explicit random generator.

Train (SimCLR-style, used for x¹ and x²): Otsu crop → resize to S×S (aspect not kept) →
RandomResizedCrop(S, scale 0.1–1, ratio 3/4–4/3) → HFlip p=0.5 → VFlip p=0.5 →
ColorJitter(0.8, 0.8, 0.8, 0.2) p=0.8 → RandomGrayscale p=0.2 → GaussianBlur(k=7, σ∈[0.1, 2]) p=0.4.
Eval: Otsu crop → resize to S×S.

Images are grayscale mammograms. The original replicates gray to RGB before these steps; every
step maps an image with three equal channels to one with three equal channels, and on such an
image saturation, hue and grayscale are the identity (a gray pixel has no saturation and no hue).
So we compute on the single channel — a third of the work — and only draw the random numbers of
those steps, which keeps the random stream the same shape as the original pipeline's.
:func:`to_rgb_chw` replicates the result to 3×S×S where a consumer needs it.

No normalisation happens here: images leave as uint8 and the model normalises on the device.
Every random decision comes from the ``np.random.Generator`` passed in, so a sample's views are a
function of its seed alone.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from mama_ray.dicom.pixels import otsu_crop  # the ingest's crop, applied again to each view

RRC_SCALE = (0.1, 1.0)  # RandomResizedCrop area share
RRC_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio range
JITTER = (0.8, 0.8, 0.8, 0.2)  # brightness, contrast, saturation, hue
JITTER_P = 0.8
GRAYSCALE_P = 0.2
BLUR_P = 0.4
BLUR_KERNEL = 7
BLUR_SIGMA = (0.1, 2.0)


def limit_threads(cpus: float) -> int:
    """Run OpenCV on as many threads as the task reserved CPUs (at least one); returns that number.

    Ray caps a task's OpenMP threads at its ``num_cpus`` (``OMP_NUM_THREADS``), but the OpenCV of
    the pip wheels runs its own pthreads pool, one thread per core of the machine, and ignores
    that. With one map task per reserved CPU each task's pool then competes with the others for
    the same cores: with OpenCV's default pool 2 map tasks on 2 CPUs spent ≈ 10 % more CPU
    seconds per pair than a DataLoader's workers doing the same work (docs/benchmarks.md,
    "Pipeline"). The setting is per process, and a map worker runs one task at a time.
    """
    threads = max(1, int(cpus))
    if cv2.getNumThreads() != threads:
        cv2.setNumThreads(threads)
    return threads


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Resize to size×size (aspect not kept); area interpolation when shrinking, else bilinear."""
    shrink = img.shape[0] * img.shape[1] > size * size
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def crop_box(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box ``(top, left, h, w)``: torchvision's 10 tries, then a centre crop."""
    area = height * width
    log_ratio = (math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*RRC_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    ratio = width / height  # fallback: the largest centre crop with an allowed aspect
    if ratio < RRC_RATIO[0]:
        w, h = width, round(width / RRC_RATIO[0])
    elif ratio > RRC_RATIO[1]:
        h, w = height, round(height * RRC_RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    top, left, h, w = crop_box(rng, *img.shape)
    return cv2.resize(img[top : top + h, left : left + w], (size, size), interpolation=cv2.INTER_LINEAR)


def color_jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """ColorJitter(0.8, 0.8, 0.8, 0.2) on a gray image: brightness and contrast in random order.

    Saturation and hue factors are drawn (as torchvision does) but are the identity on gray.
    """
    b, c, s, h = JITTER
    order = rng.permutation(4)
    factors = (rng.uniform(1 - b, 1 + b), rng.uniform(1 - c, 1 + c), rng.uniform(1 - s, 1 + s),
               rng.uniform(-h, h))
    out = img.astype(np.float32)
    for op in order:
        if op == 0:  # brightness: blend with black
            out = np.clip(out * factors[0], 0, 255)
        elif op == 1:  # contrast: blend with the mean gray level
            out = np.clip(out * factors[1] + out.mean() * (1 - factors[1]), 0, 255)
    return np.rint(out).astype(np.uint8)


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    # BORDER_REFLECT_101 is torch's "reflect" padding, as torchvision's GaussianBlur uses.
    return cv2.GaussianBlur(img, (BLUR_KERNEL, BLUR_KERNEL), sigma, borderType=cv2.BORDER_REFLECT_101)


def base_view(img: np.ndarray, size: int) -> np.ndarray:
    """Otsu crop → resize to S×S: the first steps of both transforms, a function of the image alone.

    Decoding and these two steps are most of a view's CPU; a map task that emits several pairs with
    the same image (x², method.md §1.5) computes them once (:class:`mama_ray.data.samples.BaseViews`).
    """
    return resize(otsu_crop(img), size)


def train_transform(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """One SimCLR-style view of a stored image (method.md §1.6).

    Args:
        img: H×W uint8 grayscale image as stored in the shards.
        size: output side S.
        rng: the sample's generator; all random decisions come from it.
    Returns:
        S×S uint8 array.
    """
    return augment(base_view(img, size), size, rng)


def augment(base: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """The random steps of :func:`train_transform` on a :func:`base_view` (S×S uint8)."""
    out = random_resized_crop(base, size, rng)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.5:
        out = out[::-1, :]
    if rng.random() < JITTER_P:
        out = color_jitter(out, rng)
    rng.random()  # RandomGrayscale(p=0.2): the identity on gray, drawn for the stream's shape
    if rng.random() < BLUR_P:
        out = gaussian_blur(np.ascontiguousarray(out), rng.uniform(*BLUR_SIGMA))
    return np.ascontiguousarray(out)


def eval_transform(img: np.ndarray, size: int) -> np.ndarray:
    """Otsu crop → resize to S×S (method.md §1.6 eval; the centre crop at S is a no-op)."""
    return np.ascontiguousarray(base_view(img, size))


def to_rgb_chw(img: np.ndarray) -> np.ndarray:
    """S×S gray → 3×S×S uint8 with three equal channels (the model's input layout)."""
    return np.repeat(img[None], 3, axis=0)
