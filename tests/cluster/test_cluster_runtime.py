"""mama_ray.runtime: which variables reach a cluster, exit codes, streamed output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mama_ray.config import ConfigError
from mama_ray.runtime import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    JOB_CONFIG_ENV,
    ensure_deepspeed_accelerator,
    forwarded_env,
    run_main,
)
from mama_ray.storage import StorageError


def test_forwarded_env_keeps_settings_and_drops_credentials():
    environ = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "us-east-1",
               "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_SESSION_TOKEN": "t", "DS_ACCELERATOR": "cpu", "MAMA_X": "1",
               "HOME": "/root", "PATH": "/bin"}
    assert forwarded_env(environ) == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
                                      "AWS_REGION": "us-east-1", "DS_ACCELERATOR": "cpu",
                                      "MAMA_X": "1"}


def test_forwarded_env_leaves_out_what_the_submitted_job_already_sets():
    # Ray refuses to merge a job's runtime env with a ray.init one that sets the same key.
    job = {"runtime_env": {"env_vars": {"DS_ACCELERATOR": "cpu"}, "working_dir": "x"}}
    environ = {JOB_CONFIG_ENV: json.dumps(job), "DS_ACCELERATOR": "cpu", "AWS_REGION": "eu-west-1"}
    assert forwarded_env(environ) == {"AWS_REGION": "eu-west-1"}


@pytest.mark.parametrize(("main", "code", "stderr_has"), [
    (lambda: None, EXIT_OK, ""),
    (lambda: 3, 3, ""),
    (lambda: (_ for _ in ()).throw(ConfigError("config field 'optim.lrr': unknown key")),
     EXIT_USAGE, "error: config field 'optim.lrr': unknown key"),
    (lambda: (_ for _ in ()).throw(StorageError("s3://b/x: no such key")), EXIT_USAGE,
     "error: s3://b/x: no such key"),
    (lambda: (_ for _ in ()).throw(RuntimeError("worker died")), EXIT_FAILED,
     "RuntimeError: worker died"),
])
def test_run_main_exit_codes(main, code, stderr_has, capsys):
    with pytest.raises(SystemExit) as exc:
        run_main(main)
    assert exc.value.code == code
    err = capsys.readouterr().err
    assert stderr_has in err
    if code == EXIT_USAGE:
        assert "Traceback" not in err  # a user error is one line, not a stack


def test_run_main_line_buffers_piped_output():
    # Piped stdout is block-buffered by default; a job's progress must reach `ray job logs` live.
    code = ("import sys; from mama_ray.runtime import run_main; "
            "run_main(lambda: print(sys.stdout.line_buffering, sys.stderr.line_buffering))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.split() == ["True", "True"]


def test_deepspeed_accelerator_is_cpu_without_gpus_and_a_set_value_wins(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    ensure_deepspeed_accelerator(use_gpu=True)
    assert "DS_ACCELERATOR" not in os.environ  # GPU runs let DeepSpeed detect CUDA
    ensure_deepspeed_accelerator(use_gpu=False)
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    ensure_deepspeed_accelerator(use_gpu=False)
    assert os.environ["DS_ACCELERATOR"] == "cuda"


def test_deepspeed_accelerator_is_set_in_one_place():
    """The launcher, the local context and the pretrain job all go through runtime's function."""
    root = Path(__file__).resolve().parents[2]
    setters = sorted(str(p.relative_to(root)) for d in ("mama_ray", "jobs", "tune") for p in (root / d).rglob("*.py")
                     if '"DS_ACCELERATOR"' in p.read_text())
    assert setters == ["mama_ray/runtime.py"]
    for user in ("mama_ray/train/launch.py", "mama_ray/train/context.py", "jobs/pretrain.py"):
        assert "ensure_deepspeed_accelerator(" in (root / user).read_text(), user
