"""Ray Train runs of the loop on the session cluster: ZeRO equality, S3 resume, a killed worker.

Every run uses the real TorchTrainer with 1–2 CPU workers, real DeepSpeed and the tiny model; the
single-process references use the same loop in this process (LocalContext).
"""

import json
import os
import sys
import threading
import time

import psutil
import pytest
import ray.train
import torch
from ray import cloudpickle

from mama_ray import storage
from mama_ray.layout import latest_checkpoint, read_metrics
from mama_ray.train.launch import build_trainer, run_uri

pytestmark = pytest.mark.integration


def _fit(cfg, kit, callbacks=None):
    data = lambda c, rank, world: kit.SyntheticSource(c, rank, world)  # noqa: E731
    return build_trainer(cfg, data_factory=data, build_model=kit.no_dropout_model, callbacks=callbacks).fit()


class ReportLog(ray.train.UserCallback):
    """Appends what Ray Train's controller received from each report to a JSON-lines file."""

    def __init__(self, path):
        self.path = str(path)

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as f:
            f.write(json.dumps({"ranks": metrics, "checkpoint": checkpoint is not None}) + "\n")


def _local_weights(uri, kit):
    return kit.weights(uri) if not storage.is_s3(uri) else _s3_weights(uri)


def _s3_weights(uri):
    from safetensors.torch import load

    return load(storage.read_bytes(storage.join(uri, "model", "model.safetensors")))


def _deterministic(name: str) -> bool:
    """Weights whose update is a function of the samples, not of float rounding.

    Left out: BatchNorm running statistics (per rank by design; rank 0's are saved), the biases
    right before a BatchNorm and the attention key biases (softmax ignores a constant shift), whose
    true gradient is exactly 0 — Adam normalises their rounding noise into lr-sized steps that
    differ between a 2-rank all-reduce and a 2-micro-batch sum, or between two processes.
    """
    return not any(s in name for s in ("running_", "num_batches_tracked", "head.fc1.bias", "head.fc2.bias",
                                       "k_proj.bias"))


@pytest.mark.parametrize("stage", [2, 3])
def test_two_workers_equal_one_process(stage, ray_session, tmp_path, kit):
    """2 workers × micro-batch 4 == 1 process × 2 accumulated micro-batches of 4 (same samples)."""
    over = {"deepspeed.zero_stage": stage, "train.max_steps": 4, "loss.late_loss_step": 2,
            "loss.mv_weight": 0.0,  # NT-Xent gathers the global batch: accumulation cannot reproduce it
            "storage.run_dir": str(tmp_path / "runs"), "run.name": f"eq{stage}", "train.checkpoint_every": 4}
    ray_cfg = kit.tiny_cfg(**over, **{"scaling.num_workers": 2})
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # ReportLog runs in the controller
    _fit(ray_cfg, kit, callbacks=[ReportLog(tmp_path / "reports.jsonl")])
    ref = kit.run_local(kit.tiny_cfg(**over, **{"train.grad_accum": 2}), tmp_path / "local")
    logged = read_metrics(run_uri(ray_cfg))
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    # Steps 1–3 are reported without blocking (Ray's upload thread): all arrive, in order, with
    # both ranks' rank-averaged metrics equal to rank 0's log; only step 4 carries the checkpoint.
    received = [json.loads(line) for line in (tmp_path / "reports.jsonl").read_text().splitlines()]
    steps = [r["ranks"][0]["step"] for r in received]
    received = received[len(steps) - 1 - steps[::-1].index(1):]  # the last attempt (a restart repeats from 1)
    assert [[m["step"] for m in r["ranks"]] for r in received] == [[1, 1], [2, 2], [3, 3], [4, 4]]
    assert [r["checkpoint"] for r in received] == [False, False, False, True]
    for r, mine in zip(received, logged, strict=True):
        assert r["ranks"][0]["loss"] == r["ranks"][1]["loss"] == mine["loss"]
    for got, want in zip(logged, ref.reports, strict=True):
        for term in ("loss", "clip_loss", "clip2_loss", "sla_loss"):
            assert got[term] == pytest.approx(want[term], rel=1e-5, abs=1e-6), (got["step"], term)
    a = kit.weights(latest_checkpoint(run_uri(ray_cfg)))
    b = kit.weights(tmp_path / "local" / "ckpt" / "checkpoint_00000004")
    for n in (n for n in b if _deterministic(n)):
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_interrupt_at_20_resume_on_s3(ray_session, s3_bucket, tmp_path, kit):
    """Stop after step 20 (checkpoints every 10, on s3://), start again: resumes at 20, ends like a straight run."""
    _, bucket = s3_bucket
    over = {"train.max_steps": 30, "train.checkpoint_every": 10, "train.log_every": 5, "loss.late_loss_step": 15,
            "optim.warmup_steps": 5, "storage.run_dir": f"s3://{bucket}/runs", "run.name": "resume"}
    first = kit.tiny_cfg(**over, **{"train.stop_at_step": 20})
    _fit(first, kit)
    run = run_uri(first)
    assert latest_checkpoint(run).endswith("checkpoint_00000020")
    result = _fit(kit.tiny_cfg(**over), kit)
    assert result.metrics["start_step"] == 20 and result.metrics["step"] == 30
    ckpt = latest_checkpoint(run)
    assert ckpt.startswith("s3://") and ckpt.endswith("checkpoint_00000030")
    assert storage.exists(storage.join(ckpt, "ds", "state", "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    ref = kit.run_local(kit.tiny_cfg(**{**over, "storage.run_dir": str(tmp_path)}), tmp_path / "straight")
    assert result.metrics["loss"] == pytest.approx(ref.reports[-1]["loss"], rel=1e-5)
    a, b = _s3_weights(ckpt), kit.weights(tmp_path / "straight" / "ckpt" / "checkpoint_00000030")
    # Ray's worker and this process sum floats in other orders (other thread counts); Adam turns that
    # into ≲ 1e-5 moves of near-zero-gradient weights. A broken resume (optimizer state, RNG, data
    # position) moves weights by ~lr per step (1e-3 here) and the loss beyond 1e-5.
    for n in (n for n in b if _deterministic(n)):
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    kept = {f.rsplit("/", 2)[-2] for f in storage.list_files(run, suffix="train_state.json")}
    assert kept == {"checkpoint_00000020", "checkpoint_00000030"}  # keep_checkpoints: 2


def _registered(run: str) -> bool:
    """Whether Ray Train has registered a checkpoint of the run (its checkpoint manager snapshot lists one)."""
    try:
        with open(os.path.join(run, "checkpoint_manager_snapshot.json")) as f:
            return bool(json.load(f)["checkpoint_results"])
    except (OSError, ValueError, KeyError):
        return False


def _kill_a_worker_after(run: str, stop: threading.Event, killed: list) -> None:
    """Kill (SIGKILL) one Ray Train worker process of this session once a checkpoint is registered."""
    while not stop.is_set() and not _registered(run):
        time.sleep(0.1)
    me = psutil.Process()
    while not stop.is_set() and not killed:
        for p in me.children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(p.cmdline()):
                    p.kill()
                    killed.append(p.pid)
                    return
            except psutil.Error:
                continue
        time.sleep(0.1)


def test_killed_worker_restarts_from_checkpoint(ray_session, tmp_path, kit):
    cfg = kit.tiny_cfg(**{"scaling.num_workers": 2, "train.max_steps": 20, "train.checkpoint_every": 5,
                          "train.log_every": 5, "train.max_failures": 2, "storage.run_dir": str(tmp_path),
                          "run.name": "killed"})
    stop, killed = threading.Event(), []
    # A checkpoint exists in storage once a rank uploaded it but counts only once Ray registered it.
    watcher = threading.Thread(target=_kill_a_worker_after, args=(str(tmp_path / "killed"), stop, killed))
    watcher.start()
    try:
        result = _fit(cfg, kit)
    finally:
        stop.set()
        watcher.join()
    assert killed, "no worker was killed"
    assert result.metrics["step"] == 20
    assert result.metrics["start_step"] in (5, 10, 15)  # the restarted group resumed from a checkpoint
    assert latest_checkpoint(run_uri(cfg)).endswith("checkpoint_00000020")
