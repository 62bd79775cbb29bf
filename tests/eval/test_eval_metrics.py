"""Metric functions against cases worked out by hand (method.md §5.2)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mama_ray import eval_metrics as M


def test_accuracy_and_balanced_accuracy_by_hand():
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    p = np.array([0, 0, 0, 1, 1, 0, 2, 0])
    # accuracy 5/8; recalls: class0 3/4, class1 1/2, class2 1/2 → mean 7/12
    assert M.accuracy(y, p) == pytest.approx(5 / 8)
    assert M.balanced_accuracy(y, p, 3) == pytest.approx(7 / 12)


def test_balanced_accuracy_skips_classes_absent_from_truth():
    y = np.array([0, 0, 1, 1])
    p = np.array([0, 3, 1, 1])  # class 3 predicted but never true: an error, not a recall
    assert M.per_class_recall(y, p, 4)[2:] == [pytest.approx(math.nan, nan_ok=True)] * 2
    assert M.balanced_accuracy(y, p, 4) == pytest.approx((0.5 + 1.0) / 2)


def test_confusion_matrix_rows_are_truth():
    cm = M.confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]


def test_binary_auc_uses_class_one_probability():
    y = np.array([0, 0, 1, 1])
    # class-1 probabilities 0.1, 0.6, 0.4, 0.9: pairs (pos, neg) ordered right 3 of 4 → 0.75
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.6, 0.4], [0.1, 0.9]])
    assert M.macro_auc(y, probs) == pytest.approx(0.75)


def test_macro_auc_averages_present_classes_only():
    y = np.array([0, 0, 1, 1])
    probs = np.array([
        [0.7, 0.2, 0.1],
        [0.3, 0.6, 0.1],  # class-0 OvR: pos {0.7, 0.3} vs neg {0.4, 0.1} → 3/4
        [0.4, 0.5, 0.1],  # class-1 OvR: pos {0.5, 0.8} vs neg {0.2, 0.6} → 3/4
        [0.1, 0.8, 0.1],
    ])
    # class 2 has no positives: undefined, skipped
    assert M.macro_auc(y, probs) == pytest.approx(0.75)
    assert math.isnan(M.macro_auc(np.array([1, 1]), probs[:2]))


def test_classification_metrics_applies_softmax_once():
    scores = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    out = M.classification_metrics(np.array([0, 1, 1, 1]), scores)
    # class-1 probs = sigmoid(-2), sigmoid(1), sigmoid(-1), sigmoid(3): the negative is lowest → AUC 1
    assert out["auc"] == pytest.approx(1.0)
    assert out["accuracy"] == pytest.approx(3 / 4)
    assert out["balanced_accuracy"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert out["support"] == [1, 3]
    assert out["confusion_matrix"] == [[1, 0], [1, 2]]
    assert M.softmax(scores).sum(axis=1) == pytest.approx(np.ones(4))


def test_recall_at_k_by_hand():
    sim = np.array([
        [0.9, 0.1, 0.2, 0.0],  # correct ranked 0
        [0.8, 0.5, 0.9, 0.1],  # correct 0.5 beaten by 0.8 and 0.9 → rank 2
        [0.1, 0.7, 0.6, 0.2],  # beaten by 0.7 → rank 1
        [0.4, 0.4, 0.4, 0.4],  # ties favour the match → rank 0
    ])
    assert M.recall_at_k(sim, [1, 2, 3]) == {1: 0.5, 2: 0.75, 3: 1.0}
    assert M.match_ranks(sim, np.array([2, 2, 2, 2])).tolist() == [1, 0, 1, 0]


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="N×C"):
        M.macro_auc(np.array([0, 1]), np.array([0.1, 0.9]))
    with pytest.raises(ValueError, match="empty"):
        M.recall_from_ranks(np.array([]), [1])


def test_retrieval_both_directions_by_hand(monkeypatch):
    from mama_ray.eval import retrieval

    img = np.eye(3, dtype=np.float32)
    # text 0 is closest to image 1, so image 0 → text 0 ranks 1 and text 0 → image 0 ranks 1
    txt = np.array([[0.6, 0.8, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    monkeypatch.setattr(retrieval, "CHUNK", 2)  # exercise the chunked path
    out = retrieval.retrieval_metrics(img, txt, [1, 2])
    # image→text: image0 sims (0.6, 0, 0) → rank 0; image1 (0.8, 1, 0) → 0; image2 → 0
    assert out["image_to_text"] == {"R@1": 1.0, "R@2": 1.0}
    # text→image: text0 sims (0.6, 0.8, 0) → rank 1; text1, text2 → 0
    assert out["text_to_image"] == {"R@1": pytest.approx(2 / 3), "R@2": 1.0}
    assert out["n"] == 3
