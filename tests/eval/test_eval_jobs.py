"""The entry points: export to S3 through the real job; checkpoint and task arguments."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mama_ray import storage
from mama_ray.eval.runner import check_tasks
from mama_ray.layout import resolve_checkpoint
from mama_ray.storage import s3_client

ROOT = Path(__file__).parents[2]


def _job(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / name), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "RAY_ADDRESS": ""})


@pytest.mark.integration
def test_export_job_writes_a_hugging_face_folder_to_s3(lora_checkpoint, s3_server):
    s3_client().create_bucket(Bucket="export-out")
    run_dir = str(Path(lora_checkpoint).parent)  # a run folder: its newest checkpoint is used
    proc = _job("export.py", "--checkpoint", run_dir, "--out", "s3://export-out/mama")
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = storage.list_files("s3://export-out/mama")
    names = {f.removeprefix("s3://export-out/mama/") for f in files}
    assert {"vision/config.json", "vision/model.safetensors", "text_lora/adapter_config.json",
            "text_lora/adapter_model.safetensors", "heads.safetensors", "README.md"} <= names
    assert b"balanced accuracy" in storage.read_bytes("s3://export-out/mama/README.md")


def test_checkpoint_or_run_folder_resolves(lora_checkpoint, tmp_path):
    assert resolve_checkpoint(lora_checkpoint) == lora_checkpoint
    assert resolve_checkpoint(str(Path(lora_checkpoint).parent)).endswith("/checkpoint_00000007")
    with pytest.raises(storage.StorageError, match="not a checkpoint folder"):
        resolve_checkpoint(str(tmp_path))  # a StorageError: the jobs exit with code 2


def test_unknown_tasks_name_the_valid_ones():
    with pytest.raises(ValueError, match="choose from zero_shot, probe, finetune, retrieval, attention"):
        check_tasks(["zero_shot", "tarot"])
