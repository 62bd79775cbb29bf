"""Shard I/O: the one image encode/decode path and the Parquet shard writer.

Stored images are grayscale uint8 arrays encoded losslessly (PNG). The training pipeline reads
them back with :func:`decode_image`; nothing else in mama-ray decodes a stored image.
"""

from __future__ import annotations

import cv2
import numpy as np

CODECS = ("png",)
PNG_COMPRESSION = 3  # zlib level: shards are already zstd-compressed around it; 3 is ~2× faster than 9


def _check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown image codec {codec!r}; supported: {', '.join(CODECS)}")


def encode_image(arr: np.ndarray, codec: str = "png") -> bytes:
    """Encode an H×W uint8 grayscale image losslessly.

    Args:
        arr: H×W uint8 array.
        codec: ``"png"``.
    Returns:
        The encoded bytes (deterministic for equal input).
    """
    _check_codec(codec)
    if arr.ndim != 2 or arr.dtype != np.uint8:
        raise ValueError(f"encode_image needs an H×W uint8 array, got {arr.dtype} {arr.shape}")
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr), [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise ValueError(f"PNG encoding failed for an image of shape {arr.shape}")
    return buf.tobytes()


def decode_image(data: bytes, codec: str) -> np.ndarray:
    """Decode stored image bytes back to an H×W uint8 grayscale array.

    Args:
        data: bytes written by :func:`encode_image`.
        codec: the codec stored beside them (``"png"``).
    Returns:
        H×W uint8 array.
    """
    _check_codec(codec)
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if arr is None:
        raise ValueError(f"cannot decode {len(data)} bytes as {codec}")
    return arr
