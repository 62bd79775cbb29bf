"""Probe maths: class-balanced sampling, data fractions, schedule and a separable toy problem."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mama_ray.config import ConfigError, EvalConfig
from mama_ray.eval import probe

ECFG = EvalConfig(probe_steps=60, probe_warmup_steps=5, probe_lr=0.5, probe_min_lr=0.01,
                  probe_batch_size=12)


def test_balanced_weights_are_inverse_class_counts():
    assert probe.balanced_weights(np.array([0, 0, 0, 2])).tolist() == pytest.approx([1 / 3] * 3 + [1.0])


def test_fraction_subset_size_and_seed():
    a = probe.fraction_subset(1000, 0.01, seed=42)
    assert len(a) == 10 and len(set(a)) == 10
    assert a.tolist() == probe.fraction_subset(1000, 0.01, seed=42).tolist()
    assert len(probe.fraction_subset(30, 0.01, seed=1)) == 1  # never empty
    with pytest.raises(ValueError, match="fraction"):
        probe.fraction_subset(10, 0.0, seed=1)


def test_lr_schedule_warmup_then_cosine():
    assert probe.probe_lr(0, ECFG) == pytest.approx(0.01)
    assert probe.probe_lr(4, ECFG) == pytest.approx(0.01 + 0.49 * 4 / 5)
    assert probe.probe_lr(5, ECFG) == pytest.approx(0.5)  # cosine starts at the peak
    mid = dataclasses.replace(ECFG, probe_steps=65)  # cosine spans 60 steps: halfway at step 35
    assert probe.probe_lr(35, mid) == pytest.approx((0.5 + 0.01) / 2)
    assert probe.probe_lr(60, ECFG) == pytest.approx(0.01)


def test_batches_are_class_balanced_in_expectation():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)  # 90 : 9 : 1
    seen = []
    w = torch.nn.Parameter(torch.zeros(3))

    def forward(idx):
        seen.extend(labels[idx].tolist())
        return w.expand(len(idx), 3)

    probe.train_classifier(forward, [w], labels, ECFG, seed=0)
    share = np.bincount(seen, minlength=3) / len(seen)  # 720 draws
    assert share == pytest.approx([1 / 3] * 3, abs=0.06)


def test_linear_probe_learns_separable_imbalanced_toy_set():
    rng = np.random.default_rng(0)
    counts = [60, 10, 3]
    centres = 3.0 * np.eye(3, 5)  # class c sits at 3·e_c in 5-D
    x = np.concatenate([centres[c] + 0.3 * rng.standard_normal((n, 5)) for c, n in enumerate(counts)])
    y = np.repeat(np.arange(3), counts)
    head = probe.fit_linear_probe(x, y, 3, ECFG, seed=0)
    # the class centres themselves and points pushed further out must be classified exactly
    test_x = np.concatenate([centres, 2 * centres])
    assert probe.predict_scores(head, test_x).argmax(axis=1).tolist() == [0, 1, 2, 0, 1, 2]


def test_warmup_longer_than_run_is_a_config_error():
    bad = dataclasses.replace(ECFG, probe_warmup_steps=100)
    with pytest.raises(ConfigError, match="probe_warmup_steps"):
        probe.fit_linear_probe(np.zeros((2, 2)), np.array([0, 1]), 2, bad, seed=0)


def test_inference_actors_leave_a_cpu_for_the_readers():
    from mama_ray.eval.inference import actor_cpus

    assert actor_cpus(2, 2) == pytest.approx(0.5)  # the laptop default: 2 actors + 1 reader fit in 2 CPUs
    assert actor_cpus(64, 4) == 1.0
    assert actor_cpus(1, 2) == pytest.approx(0.1)  # never zero: a zero-CPU actor would be unlimited
