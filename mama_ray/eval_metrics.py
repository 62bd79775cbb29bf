"""Metric functions of the evaluation protocols (method.md §5.2).

Classification: accuracy, balanced accuracy (mean per-class recall, the primary metric), macro
one-vs-rest AUC on softmax scores and the confusion matrix. Retrieval: recall@K. All functions take
numpy arrays and return plain Python numbers/lists so results go straight into ``metrics.json``.
The classification numbers are scikit-learn's (``accuracy_score``, ``recall_score`` per class,
``roc_auc_score``, ``confusion_matrix``); this module adds the argument checks and the rules
below for absent classes, which scikit-learn's own ``balanced_accuracy_score`` (it warns) and
multi-class ``roc_auc_score`` (it raises) do not give.

Classes that do not occur in ``y_true`` (common on small or imbalanced test sets):
* balanced accuracy averages the recall of the classes that **do** occur (a recall is undefined
  for a class with no samples); predictions of absent classes still count as errors;
* macro AUC averages the one-vs-rest AUC of the classes that have both positives and negatives
  in ``y_true``; it is NaN when no class qualifies (a single-class test set).
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import accuracy_score, recall_score, roc_auc_score
from sklearn.metrics import confusion_matrix as _sk_confusion


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax of N×C scores (numerically stable)."""
    z = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _labels(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {y.shape}")
    return y.astype(np.int64)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of exact matches."""
    y_true, y_pred = _labels(y_true), _labels(y_pred)
    if len(y_true) == 0:
        raise ValueError("accuracy of an empty label set is undefined")
    return float(accuracy_score(y_true, y_pred))


def per_class_recall(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> list[float]:
    """Recall of each class 0..C-1; NaN for a class absent from ``y_true``."""
    y_true, y_pred = _labels(y_true), _labels(y_pred)
    if len(y_true) == 0:
        return [math.nan] * num_classes
    recall = recall_score(y_true, y_pred, labels=list(range(num_classes)), average=None, zero_division=np.nan)
    return [float(r) for r in recall]


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in ``y_true`` (scikit-learn's ``balanced_accuracy_score``
    rule, on the classes 0..C-1 only)."""
    recalls = [r for r in per_class_recall(y_true, y_pred, num_classes) if not math.isnan(r)]
    if not recalls:
        raise ValueError("balanced accuracy of an empty label set is undefined")
    return float(np.mean(recalls))


def macro_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """One-vs-rest macro AUC of N×C class probabilities (softmax already applied, once).

    Binary (C = 2): the AUC of the class-1 probability. Otherwise the mean over classes with both
    positives and negatives in ``y_true`` of AUC(y == c, probs[:, c]); NaN if there are none.
    """
    y_true, probs = _labels(y_true), np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != len(y_true):
        raise ValueError(f"probs must be N×C with N={len(y_true)}, got shape {probs.shape}")
    classes = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    aucs = []
    for c in classes:
        pos = y_true == c
        if pos.any() and not pos.all():
            aucs.append(roc_auc_score(pos, probs[:, c]))
    return float(np.mean(aucs)) if aucs else math.nan


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """C×C counts; row = true class, column = predicted class."""
    return _sk_confusion(_labels(y_true), _labels(y_pred), labels=list(range(num_classes)))


def classification_metrics(y_true: np.ndarray, scores: np.ndarray) -> dict:
    """All classification metrics from N×C scores (logits, e.g. τ·cos); prediction = argmax.

    Returns:
        ``{"n", "accuracy", "balanced_accuracy", "auc", "per_class_recall", "support",
        "confusion_matrix"}`` — lists are per class, NaN recall (absent class) stored as None.
    """
    scores = np.asarray(scores, dtype=np.float64)
    num_classes = scores.shape[1]
    y_true = _labels(y_true)
    y_pred = scores.argmax(axis=1)
    recall = per_class_recall(y_true, y_pred, num_classes)
    return {
        "n": int(len(y_true)),
        "accuracy": accuracy(y_true, y_pred),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred, num_classes),
        "auc": macro_auc(y_true, softmax(scores)),
        "per_class_recall": [None if math.isnan(r) else r for r in recall],
        "support": np.bincount(y_true, minlength=num_classes).tolist(),
        "confusion_matrix": confusion_matrix(y_true, y_pred, num_classes).tolist(),
    }


def match_ranks(sim: np.ndarray, targets: np.ndarray | None = None) -> np.ndarray:
    """Rank of each query's correct item in a Q×N similarity matrix (0 = best).

    ``targets[i]`` is the column of query i's correct item (default: i, the diagonal). Rank =
    number of items scored strictly higher, so ties favour the match.
    """
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be a Q×N matrix, got shape {sim.shape}")
    rows = np.arange(sim.shape[0])
    targets = rows if targets is None else np.asarray(targets, dtype=np.int64)
    if len(targets) != len(rows) or (len(targets) and targets.max() >= sim.shape[1]):
        raise ValueError(f"targets must give one column < {sim.shape[1]} per query")
    correct = sim[rows, targets]  # Q
    return (sim > correct[:, None]).sum(axis=1)


def recall_from_ranks(ranks: np.ndarray, ks: list[int]) -> dict[int, float]:
    """Recall@K = fraction of queries whose correct item ranks below K."""
    ranks = np.asarray(ranks)
    if len(ranks) == 0:
        raise ValueError("recall@K of an empty query set is undefined")
    return {int(k): float((ranks < k).mean()) for k in ks}


def recall_at_k(sim: np.ndarray, ks: list[int], targets: np.ndarray | None = None) -> dict[int, float]:
    """Recall@K of a Q×N similarity matrix (correct item of query i: ``targets[i]``, default i)."""
    return recall_from_ranks(match_ranks(sim, targets), ks)
