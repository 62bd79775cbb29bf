"""Zero-shot BI-RADS (7 classes) and density (4 classes) classification (method.md §5.1).

For every test image the class prompts are built in the training caption format with that
image's **own unmasked** meta prefix (procedure, reason, patient and image info), so only the
class-specific sentences differ between the prompts of one image. The prompt's global text feature
is the hidden state at the first padding position (``eval.text_feature: first_pad``, as the
original zero-shot code) or the training mean pool (``mean``); score = τ·cos(image, prompt) with
τ = exp(logit_scale); prediction = argmax. Metrics use softmax(score) once (method.md §5.2).

The scoring itself is :mod:`mama_ray.models.zero_shot` (validation during training uses it too).
Inference is distributed with Ray Data: :mod:`mama_ray.eval.inference` streams the split through
an actor pool that calls :func:`score_batch`.

Class-balanced test set (``eval.balanced_test``, the paper's ``--balanced_test``; its subset files
were not released): per task, among the images with a known label, every class present keeps
``m`` images drawn without replacement with ``numpy.random.default_rng(run.seed)``, ``m`` = the
count of the rarest present class. A class with no test image is absent from the subset.
"""

from __future__ import annotations

import numpy as np
import torch

from mama_ray.config import Config
from mama_ray.data import captions
from mama_ray.data.samples import EVAL_FIELDS, eval_caption_fields
from mama_ray.eval_metrics import classification_metrics
from mama_ray.models.zero_shot import TASKS, score_fields


def row_fields(batch: dict[str, np.ndarray], i: int) -> captions.CaptionFields:
    """The unmasked caption fields of row ``i`` of an evaluation batch."""
    return eval_caption_fields({k: batch[k][i] for k in EVAL_FIELDS})


def caption_texts(batch: dict[str, np.ndarray]) -> list[str]:
    """The model texts of each row's own full, unmasked caption (method.md §1.3)."""
    return [captions.to_model_text(captions.caption_text(row_fields(batch, i)))
            for i in range(len(batch["image_id"]))]


@torch.no_grad()
def score_batch(model, tokenizer, batch: dict[str, np.ndarray], image_emb: torch.Tensor, max_len: int,
                pooling: str) -> dict:
    """τ·cos scores of every image in ``batch`` against its own class prompts.

    Args:
        image_emb: B×E global image embeddings of the batch's images.
    Returns:
        ``{"density_scores": B×4, "birads_scores": B×7}`` float32 numpy arrays.
    """
    fields = [row_fields(batch, i) for i in range(len(image_emb))]
    return score_fields(model, tokenizer, fields, image_emb, max_len, pooling)


def balanced_subset(labels: np.ndarray, seed: int) -> np.ndarray:
    """Sorted row indices of a class-balanced subset of the rows with a known label (≥ 0)."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    classes = [c for c in np.unique(labels) if c >= 0]
    if not classes:
        return np.zeros(0, dtype=np.int64)
    m = min(int((labels == c).sum()) for c in classes)
    picks = [rng.choice(np.flatnonzero(labels == c), size=m, replace=False) for c in classes]
    return np.sort(np.concatenate(picks))


def task_rows(cfg: Config, labels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Image ids evaluated per task: labelled rows, class-balanced if ``eval.balanced_test``."""
    out = {}
    for task in TASKS:
        y = np.asarray(labels[task], dtype=np.int64)
        rows = balanced_subset(y, cfg.run.seed) if cfg.eval.balanced_test else np.flatnonzero(y >= 0)
        out[task] = labels["image_id"][rows]
    return out


def task_metrics(preds: dict[str, np.ndarray], ids: dict[str, np.ndarray]) -> dict:
    """Per-task classification metrics (see :func:`metrics.classification_metrics`)."""
    out = {}
    for task in TASKS:
        rows = np.isin(preds["image_id"], ids[task])
        if not rows.any():
            raise ValueError(f"zero-shot {task}: no test image has a {task} label")
        out[task] = classification_metrics(preds[task][rows], preds[f"{task}_scores"][rows])
    return out
