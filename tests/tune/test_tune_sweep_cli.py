"""The real entry point: ``tune/sweep.py`` killed during its second trial, then ``--resume``.

The sweep runs in its own process group with its own local Ray cluster, so SIGKILL to the group
stops the driver, its cluster and the running trial at once — a lost laptop or head node. Tune
saves the experiment state every second here (``TUNE_GLOBAL_CHECKPOINT_S``); the kill comes once
that state records one finished trial and one running. The resumed sweep must keep the finished
trial as it was (its results file untouched), run the interrupted one again and finish with as
many trials as it was asked for.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mama_ray import config

SWEEP = Path(__file__).parents[2] / "tune" / "sweep.py"

pytestmark = pytest.mark.integration


def sweep_command(overrides: dict, *extra: str) -> list[str]:
    """The tiny sweep (tiny_tune, space ``tiny``) with 2 trials of 3 one-step reports."""
    # grace period = all 3 reports: ASHA may not stop a trial of random settings early here.
    sets = {**overrides, "train.max_steps": 3, "train.checkpoint_every": 3, "tune.grace_period": 3}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    return [sys.executable, str(SWEEP), "--num-samples", "2", *args, *extra]


def sweep_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local cluster
    return {**env, "TUNE_GLOBAL_CHECKPOINT_S": "1", "DS_ACCELERATOR": "cpu"}


def trial_states(sweep: Path) -> dict[str, str]:
    """Trial id → status in the latest saved Tune experiment state."""
    states = sorted(sweep.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except (json.JSONDecodeError, OSError):  # caught mid-write
        return {}
    trials = [json.loads(t[0]) for t in data["trial_data"]]
    return {t["trial_id"]: t["status"] for t in trials}


def kill_during_second_trial(proc: subprocess.Popen, sweep: Path, log: Path, timeout_s: float = 600) -> dict:
    """SIGKILL the sweep's process group once its saved state has one trial done and one running."""
    deadline = time.monotonic() + timeout_s
    while sorted((states := trial_states(sweep)).values()) != ["RUNNING", "TERMINATED"]:
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the sweep never had one trial done and one running (rc={proc.returncode}):\n"
                        f"{log.read_text()[-3000:]}")
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return states


def test_interrupted_sweep_resumes_without_rerunning(tune_shards, short_overrides, tmp_path):
    run_dir = tmp_path / "runs"
    overrides = short_overrides(tune_shards, str(run_dir))
    sweep = run_dir / "mama-tiny-sweep-tiny"
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(sweep_command(overrides), stdout=out, stderr=subprocess.STDOUT,
                                env=sweep_env(), cwd=tmp_path, start_new_session=True)
        states = kill_during_second_trial(proc, sweep, log)
    (first,) = (t for t, status in states.items() if status == "TERMINATED")
    first_results = {p: p.read_bytes() for p in sweep.glob(f"*{first}*/result.json")}
    assert len(first_results) == 1

    again = subprocess.run(sweep_command(overrides, "--resume"), capture_output=True, text=True,
                           env=sweep_env(), cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    best_path = again.stdout.strip().splitlines()[-1]  # the run ends with the best config's path
    assert best_path == str(sweep / "best_config.yaml")

    with open(sweep / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"complete"}
    assert {r["reports"] for r in rows} == {"3"} and first in {r["trial"] for r in rows}
    assert {p: p.read_bytes() for p in first_results} == first_results  # the finished trial did not run again
    best = config.load(best_path)
    assert best.run.name == "mama-tiny-sweep-tiny-best" and best.train.max_steps == 3
    assert best.optim.lr == pytest.approx(float(rows[0]["optim.lr"]))
    assert best.model.lora.r == int(rows[0]["model.lora.r"])
