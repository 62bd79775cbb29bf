"""Warm-up + cosine schedule (method.md §4) at steps worked out by hand."""

import math

import pytest

from mama_ray import config
from mama_ray.schedule import lr_at, lr_for


@pytest.mark.parametrize(("step", "expected"), [
    (0, 1e-8),  # starts at min_lr
    (5, 1e-8 + (1e-3 - 1e-8) * 0.5),  # half-way through the linear warm-up
    (10, 1e-3),  # peak at the end of warm-up
    (35, 1e-8 + (1e-3 - 1e-8) * 0.5 * (1 + math.cos(math.pi / 4))),  # a quarter into the cosine
    (60, 1e-8 + (1e-3 - 1e-8) * 0.5),  # cosine midpoint
    (110, 1e-8),  # back at min_lr at max_steps
    (500, 1e-8),  # and stays there
])
def test_lr_at_hand_values(step, expected):
    assert lr_at(step, lr=1e-3, min_lr=1e-8, warmup_steps=10, max_steps=110) == pytest.approx(expected, rel=1e-12)


def test_paper_schedule_from_config():
    cfg = config.load("base")
    assert lr_for(cfg, 0) == pytest.approx(1e-8)
    assert lr_for(cfg, 2000) == pytest.approx(1e-8 + (4e-5 - 1e-8) / 2)
    assert lr_for(cfg, 4000) == pytest.approx(4e-5)
    assert lr_for(cfg, 22000) == pytest.approx(1e-8 + (4e-5 - 1e-8) / 2)
    assert lr_for(cfg, 40000) == pytest.approx(1e-8)
