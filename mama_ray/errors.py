"""Errors shared across layers: raised deep in training, turned into exit codes by ``runtime.run_main``."""

from __future__ import annotations


class FatalTrainingError(RuntimeError):
    """A training error that a restart from the latest checkpoint would repeat."""
