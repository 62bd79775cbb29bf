"""``python jobs/pretrain.py`` with no config arguments: the embedded default run, end to end.

Synthetic DICOMs generated and ingested with the real prepare step, the tiny preset trained on 2
CPU workers with DeepSpeed ZeRO-2 under Ray Train, zero-shot evaluation, summary. Only the cache
and run folders are redirected into the test's temp folder. Started a second time, the finished
run is reported complete instead of being trained again.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _pretrain(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)  # start the job's own local cluster, as on a laptop
    args = [sys.executable, str(ROOT / "jobs" / "pretrain.py"), "--set", f"storage.cache_dir={tmp_path / 'cache'}",
            "--set", f"storage.run_dir={tmp_path / 'runs'}", *extra]
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)


def test_default_run_trains_evaluates_and_is_complete_on_rerun(tmp_path):
    first = _pretrain(tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    lines = first.stdout.strip().splitlines()
    run_dir, ckpt = lines[-2].removeprefix("run_dir: "), lines[-1].removeprefix("checkpoint: ")
    assert lines[-2].startswith("run_dir: ") and run_dir == str(tmp_path / "runs" / "mama-tiny")
    assert lines[-1].startswith("checkpoint: ") and ckpt.endswith("checkpoint_00000100")
    state = json.loads((Path(ckpt) / "train_state.json").read_text())
    assert state["step"] == 100 and len(state["data_states"]) == 2  # two workers

    logged = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    early = [m for m in logged if m["step"] <= 50]  # before the late terms join, the loss is CLIP alone
    assert early[-1]["clip_loss"] < early[0]["clip_loss"]
    assert logged[-1]["clip_loss"] < early[0]["clip_loss"]
    bacc = float(re.search(r"zero-shot density: balanced accuracy ([0-9.]+)", first.stdout).group(1))
    density = json.loads((Path(run_dir) / "eval" / "metrics.json").read_text())["zero_shot"]["density"]
    assert density["balanced_accuracy"] == pytest.approx(bacc, abs=1e-3)
    # Above chance (0.25 / AUC 0.5; an untrained model scores chance, tests/eval/test_eval_zero_shot.py).
    # Measured here 0.50 / 0.83–0.84 at the default seed with three pseudonym keys and with torch held
    # to AVX2 or no SIMD, bit-identical under full CPU load (0.49 / 0.82 and 0.50 / 0.85 at seeds 1
    # and 7), on 116 test images. A CI machine (other hardware) once got 0.36 balanced accuracy: the
    # arg-max over four prompts moves with rounding; the ranking (AUC) is what 100 steps reliably
    # learn. Numbers and their limits: docs/training.md.
    table = first.stdout[first.stdout.find("zero-shot "):]
    assert density["auc"] > 0.7 and bacc > 0.3, table

    again = _pretrain(tmp_path, "--set", "train.eval_at_end=false")
    assert again.returncode == 0, again.stderr[-4000:]
    assert "already complete" in again.stdout
    assert again.stdout.strip().splitlines()[-1] == lines[-1]
