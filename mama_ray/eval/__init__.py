"""Evaluation of a pretrained MaMA checkpoint (method.md §5): zero-shot, probes, retrieval, pictures.

Public API: :func:`run_zero_shot` (called by the pretraining job at its end) and
:func:`evaluate` (``jobs/evaluate.py``); the metric functions live in :mod:`mama_ray.eval_metrics`.
"""

from mama_ray.eval.outputs import zero_shot_table
from mama_ray.eval.runner import ALL_TASKS, DEFAULT_TASKS, evaluate, run_zero_shot

__all__ = ["ALL_TASKS", "DEFAULT_TASKS", "evaluate", "zero_shot_table", "run_zero_shot"]
