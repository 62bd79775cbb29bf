"""``data.map_resources`` puts the preprocessing tasks on the nodes that offer the resource (issue 15).

A two-node ``ray.cluster_utils.Cluster`` in a subprocess (this session's cluster is never
touched): the head — where the driver, i.e. the trainer, runs — has CPUs but no ``ingest_cpu``;
the second node offers ``ingest_cpu``. The pipeline's own dataset builder with
``data.map_resources = {ingest_cpu: 1}`` runs a probe map function that records its node, and
a real training epoch streams on that cluster.
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
    import importlib.util, json, sys
    from pathlib import Path
    import numpy as np
    import ray
    from ray.cluster_utils import Cluster

    out = Path(sys.argv[1])
    spec = importlib.util.spec_from_file_location("data_kit", sys.argv[2])
    kit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kit)
    from mama_ray import config
    from mama_ray.data import pipeline, stream

    def where(items, fs):  # a map function that reports the node it ran on, one row per item
        yield {"node": np.array([ray.get_runtime_context().get_node_id()] * items.num_rows)}

    kit.make_shards(out / "shards", 20, seed=3)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2, resources={"ingest_cpu": 2})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        cfg = config.load("tiny_cpu", {"data.shards": str(out / "shards"), "data.image_size": 32,
                                       "train.micro_batch_size": 4, "text.max_len": 144,
                                       "data.map_resources": {"ingest_cpu": 1.0}})
        ran_on = [str(n) for n in stream._item_dataset(cfg, [{"i": k} for k in range(6)], where, {})
                  .take_all() for n in [n["node"]]]
        samples = sum(len(b["image_id"]) for b in pipeline.iter_train_batches(cfg, 0))
        me = ray.get_runtime_context().get_node_id()
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        (out / "result.json").write_text(json.dumps({"ran_on": ran_on, "driver": me, "nodes": nodes,
                                                     "samples": samples,
                                                     "expected": pipeline.samples_per_rank(cfg, 1)}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def test_map_tasks_run_only_on_nodes_with_the_resource(tmp_path):
    script = tmp_path / "placement.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)  # the subprocess starts its own cluster
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(ROOT / "tests" / "conftest.py")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "result.json").read_text())
    other = set(r["nodes"]) - {r["driver"]}
    assert len(r["nodes"]) == 2 and len(other) == 1
    assert len(r["ran_on"]) == 6 and set(r["ran_on"]) == other  # never on the trainer's (driver's) node
    assert r["samples"] == r["expected"] > 0  # a real epoch streams with its tasks placed there
