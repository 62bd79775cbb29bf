"""The small context the worker loop is written against: who am I, where do I train, how do I report.

:class:`RayTrainContext` wraps ``ray.train`` inside a ``TorchTrainer`` worker; :class:`LocalContext`
runs the same loop in one plain process (tests, benchmarks, debugging) and keeps its checkpoints in
a local folder with the same keep-last-K rule.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mama_ray import storage
from mama_ray.runtime import ensure_deepspeed_accelerator


class TrainContext:
    """What the loop needs from its runtime. Subclasses fill in the fields and the three methods."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None, name: str | None = None) -> None:
        """Publish metrics (and this rank's part of a checkpoint folder). A barrier: every rank calls it."""
        raise NotImplementedError

    def checkpoint_dir(self) -> contextlib.AbstractContextManager[str | None]:
        """Context yielding a local folder with the checkpoint to resume from, or None."""
        raise NotImplementedError


class RayTrainContext(TrainContext):
    """Inside a Ray Train worker. ``resume_from`` is used only when the run has no checkpoint yet."""

    def __init__(self, resume_from: str = "", storage_filesystem=None):
        import ray.train  # why: LocalContext (tests, benchmarks) runs without Ray Train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self._resume_from = resume_from
        self._fs = storage_filesystem

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None, name: str | None = None) -> None:
        import ray.train  # why: LocalContext (tests, benchmarks) runs without Ray Train

        if not checkpoint_dir:
            # Train V2's controller takes one report per worker per poll (every 2 s) and a worker
            # holds one, so a synchronous report waits for that poll. Metric-only reports go to
            # Ray's upload thread instead, which keeps their order; the barrier stays synchronous.
            ray.train.report(metrics, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
            return
        # Synchronous: the folder is a temporary directory the loop deletes after this call.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                         checkpoint_dir_name=name)

    @contextlib.contextmanager
    def checkpoint_dir(self) -> Iterator[str | None]:
        import ray.train  # why: LocalContext (tests, benchmarks) runs without Ray Train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None and self._resume_from:
            ckpt = _checkpoint_from_uri(self._resume_from, self._fs)
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield d


def _checkpoint_from_uri(uri: str, fs=None):
    """A ``ray.train.Checkpoint`` for a user-given URI (local or s3://)."""
    import ray.train  # why: LocalContext (tests, benchmarks) runs without Ray Train

    if fs is None:
        fs, path = storage.filesystem(uri)
    else:
        path = storage.filesystem(uri)[1]
    return ray.train.Checkpoint(path=path, filesystem=fs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalContext(TrainContext):
    """One process, world size 1, checkpoints under ``root/checkpoint_*`` (latest K kept).

    Use as a context manager: it creates the one-rank gloo process group DeepSpeed needs (once per
    process; later contexts reuse it).
    """

    def __init__(self, root: str | Path, keep: int = 2, resume_from: str | None = None):
        self.root = Path(root)
        self.keep = keep
        self.resume_from = resume_from
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: list[Path] = sorted(self.root.glob("checkpoint_*"))

    def __enter__(self) -> LocalContext:
        ensure_deepspeed_accelerator(use_gpu=False)  # one process on the CPU (tests, benchmarks)
        if not torch.distributed.is_initialized():
            port = free_port()
            for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                         "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
                os.environ[k] = v
            torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        return self

    def __exit__(self, *exc) -> None:
        # The group stays for the life of the process: DeepSpeed caches it, so a destroyed and
        # re-created group breaks the next deepspeed.initialize in the same process.
        return None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None, name: str | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir:
            dest = self.root / (name or f"checkpoint_{len(self.reports):08d}")
            shutil.copytree(checkpoint_dir, dest, dirs_exist_ok=True)
            self.checkpoints = [c for c in self.checkpoints if c != dest] + [dest]
            while len(self.checkpoints) > self.keep:
                shutil.rmtree(self.checkpoints.pop(0), ignore_errors=True)

    @contextlib.contextmanager
    def checkpoint_dir(self) -> Iterator[str | None]:
        if self.checkpoints:
            yield str(self.checkpoints[-1])
        else:
            yield self.resume_from
