"""A training run on a two-node ``ray.cluster_utils.Cluster`` places one worker per node and completes.

The cluster runs in a subprocess so this session's Ray cluster (the ``ray_session`` fixture) is
never touched. Each node offers one ``trainer_slot`` and each worker asks for one, through the
ordinary ``scaling.resources_per_worker`` config field.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import importlib.util, json, os, sys
    from pathlib import Path
    os.environ["DS_ACCELERATOR"] = "cpu"
    out = Path(sys.argv[1])
    import ray
    from ray import cloudpickle
    from ray.cluster_utils import Cluster

    spec = importlib.util.spec_from_file_location("train_kit", sys.argv[2])
    kit = importlib.util.module_from_spec(spec)
    sys.modules["train_kit"] = kit
    spec.loader.exec_module(kit)
    cloudpickle.register_pickle_by_value(kit)
    from mama_ray.layout import latest_checkpoint
    from mama_ray.train.launch import build_trainer, run_uri

    def data(cfg, rank, world):
        (out / f"rank{rank}.node").write_text(ray.get_runtime_context().get_node_id())
        return kit.SyntheticSource(cfg, rank, world)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"trainer_slot": 1}})
    cluster.add_node(num_cpus=2, resources={"trainer_slot": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        cfg = kit.tiny_cfg(**{"scaling.num_workers": 2, "scaling.resources_per_worker": {"trainer_slot": 1.0},
                              "train.max_steps": 4, "train.checkpoint_every": 2, "train.log_every": 2,
                              "storage.run_dir": str(out / "runs"), "run.name": "two-nodes"})
        result = build_trainer(cfg, data_factory=data, build_model=kit.no_dropout_model).fit()
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        (out / "result.json").write_text(json.dumps({
            "step": result.metrics["step"], "checkpoint": latest_checkpoint(run_uri(cfg)), "nodes": nodes}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def test_two_node_cluster_one_worker_per_node(tmp_path):
    script = tmp_path / "two_nodes.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)  # the subprocess starts its own cluster
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(ROOT / "tests" / "train" / "conftest.py")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    placed = {(tmp_path / f"rank{r}.node").read_text() for r in (0, 1)}
    assert len(result["nodes"]) == 2 and placed == set(result["nodes"])  # one worker on each node
    assert result["step"] == 4 and result["checkpoint"].endswith("checkpoint_00000004")
