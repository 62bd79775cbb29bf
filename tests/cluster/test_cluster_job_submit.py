"""The jobs under `ray job submit`: a real `ray start --head` on 127.0.0.1, the real Jobs CLI.

The head runs in its own session with its own temp dir, ports and token (Ray 2.60 token auth),
and is stopped by signalling that session's processes only — other Ray clusters on the machine
are left alone. Jobs are submitted with cluster/runtime_env.yaml, as the README tells users to.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
PRETRAIN = "jobs/pretrain.py"  # relative: the entrypoint runs in the uploaded working dir
pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _session_pids(sid: int) -> list[int]:
    """Processes of one session (the head and everything it spawned), from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # Fields after "pid (comm)": state ppid pgrp session …; zombies are already gone.
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _stop_session(sid: int, grace_s: float = 10.0) -> None:
    """SIGTERM the session leader (`ray start --block` then stops its node), SIGKILL leftovers."""
    os.kill(sid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Head:
    """A `ray start --head --block` in its own session; `submit`/`logs`/`status` talk to it."""

    def __init__(self, tmp: Path, extra_env: dict[str, str | None] | None = None):
        """``extra_env``: extra environment of the node (and so of its jobs); a None value removes a variable."""
        self.tmp = tmp
        token = tmp / "auth_token"
        self.token = secrets.token_hex(32)
        token.write_text(self.token)
        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.client_env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        gcs, dash, client, agent, agent_grpc, rt_agent, metrics, nm, om = _free_ports(9)
        self.address, self.metrics_port = f"http://127.0.0.1:{dash}", metrics
        cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
               f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
               "--include-dashboard=true", f"--ray-client-server-port={client}",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={rt_agent}", f"--metrics-export-port={metrics}",
               f"--node-manager-port={nm}", f"--object-manager-port={om}",
               "--num-cpus=4", f"--object-store-memory={300 * 1024**2}",
               f"--temp-dir={tmp / 'ray'}", "--disable-usage-stats"]
        # The raylet's environment is what job drivers and workers inherit.
        env = {**self.client_env, "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_TRAIN_ENABLE_STATE_TRACKING": "0"}
        for k, v in (extra_env or {}).items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        self.log = open(tmp / "head.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited:\n{(self.tmp / 'head.log').read_text()}")
            if self.cli("job", "list", check=False).returncode == 0:
                return
            time.sleep(1.0)
        raise TimeoutError(f"head not ready:\n{(self.tmp / 'head.log').read_text()}")

    def cli(self, *args: str, check: bool = True, timeout_s: float = 60.0):
        return subprocess.run([RAY, *args, "--address", self.address], cwd=REPO,
                              env=self.client_env, capture_output=True, text=True,
                              check=check, timeout=timeout_s)

    def submit(self, job_id: str, entrypoint: list[str], wait: bool = True, timeout_s: float = 900.0):
        """`ray job submit` from the repo root with cluster/runtime_env.yaml, as users run it."""
        cmd = [RAY, "job", "submit", "--address", self.address, "--submission-id", job_id,
               "--runtime-env", "cluster/runtime_env.yaml", *([] if wait else ["--no-wait"]),
               "--", *entrypoint]
        deadline = time.monotonic() + 240.0
        while True:
            done = subprocess.run(cmd, cwd=REPO, env=self.client_env, capture_output=True,
                                  text=True, timeout=timeout_s)
            # The job API answers before the head's dashboard agent has registered (a minute
            # and more on a loaded machine); Ray asks to try again later.
            if "No available agent to submit job" not in done.stderr or time.monotonic() > deadline:
                return done
            time.sleep(2.0)

    def status(self, job_id: str) -> tuple[str, str]:
        """What `ray job status` says — succeeded, failed, was (stopped), PENDING, RUNNING — and all of it."""
        out = self.cli("job", "status", job_id, "--log-style=record").stdout
        found = re.search(r"Job '[^']+' (\w+)|Status for job '[^']+': (\w+)", out)
        assert found, out
        return found.group(1) or found.group(2), out

    def wait(self, job_id: str, timeout_s: float = 300.0) -> tuple[str, str]:
        deadline = time.monotonic() + timeout_s
        while (state := self.status(job_id))[0] in ("PENDING", "RUNNING"):
            assert time.monotonic() < deadline, f"job {job_id} still {state}"
            time.sleep(2.0)
        return state

    def __enter__(self) -> Head:
        """The node once its dashboard answers; stopped on leaving, also when it never came up."""
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        _stop_session(self.proc.pid)
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    with Head(tmp_path_factory.mktemp("head")) as h:
        yield h


@pytest.fixture(scope="module")
def bad_job(head) -> str:
    """A job with a misspelt config field, submitted without waiting so it runs beside the next."""
    entry = [sys.executable, PRETRAIN, "--set", "optim.lrr=1"]
    done = head.submit("pretrain-bad", entry, wait=False, timeout_s=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return "pretrain-bad"


def test_pretrain_job_succeeds_and_writes_a_checkpoint(head, bad_job, tmp_path):
    run_dir = tmp_path / "runs"
    entry = [sys.executable, PRETRAIN, "--config", "tiny_cpu",
             "--set", "run.name=submitted", "--set", f"storage.run_dir={run_dir}",
             "--set", f"storage.cache_dir={tmp_path / 'cache'}",
             "--set", "data.synthetic_studies=16",
             "--set", "train.max_steps=4", "--set", "optim.warmup_steps=1",
             "--set", "train.checkpoint_every=2", "--set", "train.keep_checkpoints=2",
             "--set", "train.log_every=2",
             "--set", "train.micro_batch_size=2", "--set", "train.eval_at_end=false",
             "--set", "train.max_failures=0"]  # fail fast: this cluster has no node to lose
    done = head.submit("pretrain-ok", entry)
    logs = head.cli("job", "logs", "pretrain-ok").stdout
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{logs[-3000:]}"
    assert head.status("pretrain-ok")[0] == "succeeded"
    states = sorted(run_dir.rglob("checkpoint_*/train_state.json"))  # not <run>/best/ (the best by val)
    assert states, f"no checkpoint under {run_dir}: {sorted(run_dir.rglob('*'))[:20]}"
    steps = sorted(json.loads(p.read_text())["step"] for p in states)
    assert steps == [2, 4]  # checkpoint_every=2 up to max_steps=4
    last = states[-1].parent
    saved = yaml.safe_load((last / "config.yaml").read_text())  # the --set values reached the job
    assert (saved["run"]["name"], saved["train"]["max_steps"]) == ("submitted", 4)
    # Both Ray Train workers of the submitted job wrote their part into the same checkpoint.
    assert sorted(p.name for p in (last / "rng").iterdir()) == ["rank_0.pt", "rank_1.pt"]


def test_bad_config_job_fails_naming_the_field(head, bad_job):
    state, status = head.wait(bad_job)
    assert state == "failed"
    assert "exit code 2" in status  # EXIT_USAGE: the input is wrong, not the work
    logs = head.cli("job", "logs", bad_job).stdout
    assert "error: config field 'optim.lrr': unknown key" in logs
    assert "Traceback" not in logs  # a user error is one line (exit code 2), not a stack
