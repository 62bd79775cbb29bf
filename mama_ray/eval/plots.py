"""Evaluation pictures as PNG bytes: confusion matrices, ROC curves and sentence→patch heatmaps.

Every function returns the encoded PNG so the caller writes it with :mod:`mama_ray.storage`
(local or s3://) beside ``metrics.json``. Matplotlib runs on the Agg backend (no display).
The heatmap view is the paper's interpretability figure: for each sentence k of an image's own
caption, the cosine similarity between the sentence's local embedding and every patch's local
embedding, upsampled to the image and drawn over it.
"""

from __future__ import annotations

import io
import textwrap

import matplotlib

matplotlib.use("Agg")
import cv2  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from mama_ray.eval_metrics import softmax  # noqa: E402
from mama_ray.models.zero_shot import CLASS_NAMES  # noqa: E402

DPI = 100


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def confusion_png(cm: np.ndarray, class_names: list[str], title: str) -> bytes:
    """Row-normalised confusion matrix (colour = recall share), raw counts written in the cells."""
    cm = np.asarray(cm, dtype=np.float64)  # C×C, row = true class
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = 1.0 + 0.6 * len(class_names)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center",
                    color="white" if share[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of true class")
    return _png(fig)


def roc_png(y_true: np.ndarray, probs: np.ndarray, class_names: list[str], title: str) -> bytes:
    """One-vs-rest ROC curve per class that has positives and negatives (binary: class 1 only)."""
    y_true = np.asarray(y_true)
    fig, ax = plt.subplots(figsize=(5, 5))
    classes = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    for c in classes:
        pos = y_true == c
        if pos.any() and not pos.all():
            fpr, tpr, _ = roc_curve(pos, probs[:, c])
            ax.plot(fpr, tpr, label=class_names[c])
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def patch_heatmap(sim: np.ndarray, height: int, width: int) -> np.ndarray:
    """P patch similarities (P = g·g, row-major grid) → H×W map upsampled bilinearly."""
    side = int(round(np.sqrt(len(sim))))
    if side * side != len(sim):
        raise ValueError(f"{len(sim)} patch similarities do not form a square grid")
    grid = np.asarray(sim, dtype=np.float32).reshape(side, side)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_LINEAR)


def sentence_heatmaps_png(image: np.ndarray, sims: np.ndarray, sentences: list[str], title: str) -> bytes:
    """The mammogram and one panel per sentence with its sentence→patch similarity overlaid.

    Args:
        image: H×W or H×W×3 (or 3×H×W) uint8 image as the model saw it.
        sims: K×P cosine similarities of the K sentences to the P patches.
        sentences: K sentence texts (panel titles).
    """
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[0] in (1, 3):
        img = img.transpose(1, 2, 0)
    gray = img if img.ndim == 2 else img[..., 0]
    h, w = gray.shape
    cols = min(4, len(sentences) + 1)
    rows = -(-(len(sentences) + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.4 * rows), squeeze=False)
    axes[0, 0].imshow(gray, cmap="gray")
    axes[0, 0].set_title("image", fontsize=8)
    lo, hi = float(np.min(sims)), float(np.max(sims))
    for k, text in enumerate(sentences):
        ax = axes.flat[k + 1]
        ax.imshow(gray, cmap="gray")
        ax.imshow(patch_heatmap(sims[k], h, w), cmap="jet", alpha=0.45, vmin=lo, vmax=hi)
        ax.set_title("\n".join(textwrap.wrap(text.strip(), 38)[:3]), fontsize=6)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return _png(fig)


def classification_pngs(prefix: str, task: str, metrics: dict, y: np.ndarray, scores: np.ndarray) -> dict[str, bytes]:
    """Confusion matrix and ROC curves of one task: ``{file name: png}``."""
    names = CLASS_NAMES[task]
    title = f"{prefix.replace('_', ' ')} {task}: bal. acc {metrics['balanced_accuracy']:.3f}"
    return {f"{prefix}_{task}_confusion.png": confusion_png(np.array(metrics["confusion_matrix"]), names, title),
            f"{prefix}_{task}_roc.png": roc_png(y, softmax(scores), names, title)}
