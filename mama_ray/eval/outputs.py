"""Writing evaluation results: ``metrics.json`` (JSON-safe), per-image predictions as Parquet and
the printed zero-shot table. The ``metrics.json`` layout is documented in ``docs/evaluation.md``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mama_ray import storage
from mama_ray.models.zero_shot import NUM_CLASSES, TASKS


def _jsonable(value):
    """NaN → None (JSON has no NaN), numpy scalars → Python numbers, recursively."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def predictions_parquet(preds: dict) -> bytes:
    """Per-image labels and zero-shot scores (τ·cos) as Parquet bytes."""
    cols = {k: pa.array(preds[k]) for k in ("image_id", "density", "birads")}
    for task in TASKS:
        scores = np.ascontiguousarray(preds[f"{task}_scores"], dtype=np.float32)  # N×K
        cols[f"{task}_scores"] = pa.FixedSizeListArray.from_arrays(pa.array(scores.ravel()), scores.shape[1])
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table(cols), buf)
    return buf.getvalue().to_pybytes()


def zero_shot_table(metrics: dict) -> str:
    """The zero-shot summary table (one line per task)."""
    lines = [f"{'zero-shot':<10}{'n':>7}{'acc':>8}{'bal.acc':>9}{'AUC':>8}{'chance':>8}"]
    for task in TASKS:
        m = metrics[task]
        lines.append(f"{task:<10}{m['n']:>7}{m['accuracy']:>8.3f}{m['balanced_accuracy']:>9.3f}"
                     f"{m['auc']:>8.3f}{1 / NUM_CLASSES[task]:>8.3f}")
    return "\n".join(lines)


def write_outputs(out_uri: str, metrics: dict, files: dict[str, bytes], opts: storage.StorageOptions) -> None:
    """``metrics.json`` and every file (names may contain one sub-folder) under ``out_uri``."""
    for name, data in files.items():
        storage.write_bytes(storage.join(out_uri, name), data, opts)
    text = json.dumps(_jsonable(metrics), indent=1, allow_nan=False)
    storage.write_bytes(storage.join(out_uri, "metrics.json"), text.encode(), opts)
