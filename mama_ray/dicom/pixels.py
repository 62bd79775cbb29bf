"""Pixel normalisation: stored values → display values → uint8, crop to the breast, resize.

Two scalings (``ingest.scaling``):

* ``voi`` — modality LUT (rescale slope/intercept or LUT), then the VOI LUT or the *first*
  window (linear or sigmoid, DICOM PS3.3 C.11.2.1.2) into 0–255; without either, min–max over
  the modality values;
* ``minmax`` — the original code: raw ``pixel_array`` × 255 / max (no LUT, no min shift).

MONOCHROME1 (bright = low value) is inverted afterwards so every image has MONOCHROME2 polarity.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut


@dataclass(frozen=True)
class PixelSettings:
    long_side: int = 1024  # output long side in px
    scaling: str = "voi"  # "voi" or "minmax"
    crop: bool = True  # Otsu breast crop before resizing

    @classmethod
    def from_config(cls, ingest_cfg) -> PixelSettings:
        return cls(ingest_cfg.long_side, ingest_cfg.scaling, ingest_cfg.crop)


def _first(value) -> float:
    """The first of a possibly multi-valued DS (several windows → the first one)."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _window(x: np.ndarray, ds: Dataset) -> np.ndarray:
    """First window of the dataset → values in [0, 1] (linear or sigmoid VOI LUT function)."""
    c, w = _first(ds.WindowCenter), max(_first(ds.WindowWidth), 1.0)
    if str(ds.get("VOILUTFunction", "LINEAR")).upper() == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    return np.clip((x - (c - 0.5)) / max(w - 1.0, 1.0) + 0.5, 0.0, 1.0)


def _minmax01(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _voi01(raw: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality LUT, then VOI LUT sequence, first window, or min–max → float in [0, 1]."""
    x = apply_modality_lut(raw, ds).astype(np.float64)
    if "VOILUTSequence" in ds:
        y = apply_voi_lut(x, ds, index=0, prefer_lut=True).astype(np.float64)
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return np.clip(y / float(2**bits - 1), 0.0, 1.0)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        return _window(x, ds)
    return _minmax01(x)


def to_uint8(raw: np.ndarray, ds: Dataset, scaling: str) -> np.ndarray:
    """Stored pixel values (H×W) → uint8 with MONOCHROME2 polarity.

    Args:
        raw: ``ds.pixel_array`` of a single-frame grayscale dataset.
        ds: the dataset (LUT, window and photometric tags).
        scaling: ``"voi"`` or ``"minmax"`` (see module docstring).
    """
    if scaling == "minmax":
        hi = float(raw.max())
        y = np.clip(raw.astype(np.float64) * (255.0 / hi), 0, 255) if hi > 0 else np.zeros(raw.shape)
    elif scaling == "voi":
        y = _voi01(raw, ds) * 255.0
    else:
        raise ValueError(f"unknown scaling {scaling!r}; use 'voi' or 'minmax'")
    img = np.rint(y).astype(np.uint8)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        img = 255 - img
    return img


def otsu_crop(img: np.ndarray) -> np.ndarray:
    """Crop to the bounding box of the Otsu foreground (the breast); the whole image if there is none.

    The one implementation: ingest crops stored images with it, and the training and eval
    transforms (``mama_ray.data.transforms``) crop each view with it again.
    """
    if img.ndim != 2 or img.dtype != np.uint8 or min(img.shape) == 0:
        raise ValueError(f"otsu_crop needs a non-empty H×W uint8 grayscale image, got {img.dtype} {img.shape}")
    _, mask = cv2.threshold(img, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    x, y, w, h = cv2.boundingRect(mask)  # the box of the non-zero pixels; all zeros → (0, 0, 0, 0)
    if w == 0 or h == 0:
        return img
    return img[y : y + h, x : x + w]


def resize_long_side(img: np.ndarray, long_side: int) -> np.ndarray:
    """Resize so the long side is ``long_side`` px, keeping the aspect ratio (INTER_AREA down)."""
    h, w = img.shape
    scale = long_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # cv2 takes (width, height)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(img, size, interpolation=interp)


def preprocess(raw: np.ndarray, ds: Dataset, settings: PixelSettings) -> np.ndarray:
    """Stored pixels → scaled, polarity-fixed, cropped, resized uint8 image (H×W)."""
    img = to_uint8(raw, ds, settings.scaling)
    if settings.crop:
        img = otsu_crop(img)
    return resize_long_side(img, settings.long_side)
