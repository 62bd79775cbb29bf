"""Which training failures a restart can fix: restart after a lost node, stop on a repeatable error.

Ray Train restarts the worker group after any worker error, up to ``train.max_failures`` times,
from the latest checkpoint. That is right for a lost node or a dropped connection, and wasteful for
an error that will happen again: a bug or a bad setting in the first step of an attempt (the bf16
dtype crash restarted the group three times before failing), or a loss that has diverged (a
restart loads the last finite checkpoint and diverges again). Such errors are raised as
:class:`FatalTrainingError`; :class:`StopOnFatalPolicy` makes the controller fail the run on them
at once and leaves every other failure to Ray's default policy.

Ray 2.60 has no public hook for the failure policy, so :class:`MamaTorchTrainer` swaps the factory
its ``fit`` calls (``ray.train.v2.api.data_parallel_trainer.create_failure_policy``) for the
duration of ``fit``; ``tests/train/test_train_failure.py`` pins the behaviour, so a Ray upgrade
that moves it fails there (docs/pitfalls.md).
"""

from __future__ import annotations

import contextlib

import torch

from mama_ray.errors import FatalTrainingError

# Errors of the machinery around the step, not of the step itself: a restart may well fix them.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError, ConnectionError,
                                                      torch.distributed.DistError)


def as_fatal_first_step_error(exc: BaseException, step: int) -> FatalTrainingError | None:
    """``exc`` raised before the attempt's first optimizer step finished, as a fatal error.

    Returns None for :data:`TRANSIENT_ERRORS` (and their causes): those stay retryable.
    """
    seen = exc
    while seen is not None:
        if isinstance(seen, TRANSIENT_ERRORS):
            return None
        seen = seen.__cause__
    return FatalTrainingError(f"step {step} (the first of this attempt) failed: "
                              f"{type(exc).__name__}: {exc}; not restarting, a restart would repeat it")


def _fatal_in(exc: BaseException) -> FatalTrainingError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, FatalTrainingError):
            return seen
        seen = getattr(seen, "_base_exc", None) or seen.__cause__  # Ray wraps the user exception
    return None


def is_fatal(exc: BaseException) -> bool:
    """Whether ``exc`` (a worker's error as Ray Train hands it to the controller) is fatal."""
    return _fatal_in(exc) is not None


def fatal_error_of(exc: BaseException) -> FatalTrainingError | None:
    """The first worker's :class:`FatalTrainingError` inside a failed ``fit()``'s error, if any."""
    failures = getattr(exc, "worker_failures", None) or {}
    for rank in sorted(failures):
        fatal = _fatal_in(failures[rank])
        if fatal is not None:
            return FatalTrainingError(f"rank {rank}: {fatal}")
    return _fatal_in(exc)


def _policy_class():
    # why: Ray Train (its private v2 API here) loads only where a trainer or policy is built; workers import this module
    from ray.train.v2._internal.execution.failure_handling import (
        DefaultFailurePolicy,
        FailureDecision,
    )

    # why: Ray Train (its private v2 API here) loads only where a trainer or policy is built; workers import this module
    from ray.train.v2.api.exceptions import WorkerGroupError

    class StopOnFatalPolicy(DefaultFailurePolicy):
        """Ray's default policy, except that a fatal error on any worker ends the run."""

        def make_decision(self, training_failed_error):
            if isinstance(training_failed_error, WorkerGroupError) and any(
                    is_fatal(e) for e in training_failed_error.worker_failures.values()):
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)

    return StopOnFatalPolicy


@contextlib.contextmanager
def stop_on_fatal_errors():
    """While active, trainers started in this process use :class:`StopOnFatalPolicy`."""
    # why: Ray Train (its private v2 API here) loads only where a trainer or policy is built; workers import this module
    import ray.train.v2.api.data_parallel_trainer as dpt

    original = dpt.create_failure_policy
    policy = _policy_class()
    dpt.create_failure_policy = lambda failure_config: policy(failure_config)
    try:
        yield
    finally:
        dpt.create_failure_policy = original


def mama_torch_trainer_class():
    """``TorchTrainer`` whose ``fit`` stops on :class:`FatalTrainingError` instead of restarting."""
    # why: Ray Train (its private v2 API here) loads only where a trainer or policy is built; workers import this module
    from ray.train.torch import TorchTrainer

    class MamaTorchTrainer(TorchTrainer):
        def fit(self):
            with stop_on_fatal_errors():
                return super().fit()

    return MamaTorchTrainer
