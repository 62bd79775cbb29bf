"""Where the ingest's work runs: in Ray tasks, never through the driver, on the nodes it is told.

The driver's every object fetch is watched (a spy on the Ray worker's ``get_objects``, in this
process only) while a real ingest runs; the placement test runs a two-node
``ray.cluster_utils.Cluster`` in a subprocess so the session's cluster is never touched.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mama_ray.config import load
from mama_ray.data.ingest import run_ingest
from mama_ray.data.shards import read_manifest, shard_files
from mama_ray.data.synthetic import make_synthetic

REPO = Path(__file__).resolve().parents[2]
KEY_ENV = "TEST_TASKS_PSEUDONYM_KEY"


@pytest.mark.slow
def test_the_driver_never_fetches_an_image(ray_session, tmp_path, monkeypatch):
    from ray._private.worker import Worker

    dicoms, tables = make_synthetic(str(tmp_path / "syn"), 6, 11)
    monkeypatch.setenv(KEY_ENV, "tasks test key 0123456789abcdef")
    fetched, receipts, real = [], [], Worker.get_objects

    def spy(self, refs, *args, **kwargs):
        values, breakpoint_ = real(self, refs, *args, **kwargs)
        fetched.extend(len(pickle.dumps(v)) for v in values)
        return values, breakpoint_

    monkeypatch.setattr(Worker, "get_objects", spy)
    cfg = load("tiny_cpu", ["ingest.long_side=128", "ingest.studies_per_shard=2", f"ingest.pseudonym_key=env:{KEY_ENV}"])
    summary = run_ingest(dicoms, str(tmp_path / "out"), cfg, tables=tables, on_shard=receipts.append)
    monkeypatch.setattr(Worker, "get_objects", real)
    rows = [r for f in shard_files(str(tmp_path / "out")) for r in pq.read_table(f).to_pylist()]
    smallest = min(len(i["image"]) for r in rows for i in r["images"])
    assert len(receipts) == summary.shards == 3 and len(fetched) >= len(receipts)  # the spy saw the receipts
    assert max(fetched) < 2048 < smallest, (max(fetched), smallest)  # nothing as large as one image
    manifest = read_manifest(str(tmp_path / "out"))["shards"]
    assert [(r["images"], r["bytes"], r["sha256"]) for r in sorted(receipts, key=lambda r: r["shard"])] == [
        (m["images"], m["bytes"], m["sha256"]) for m in manifest]  # the counters a metric can feed on
    assert sum(r["quarantined"] for r in receipts) == 0 and all(r["reasons"] == {} for r in receipts)


SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import ray
    from ray.cluster_utils import Cluster
    from mama_ray.config import load
    from mama_ray.data.ingest import run_ingest
    from mama_ray.data.synthetic import make_synthetic

    out = Path(sys.argv[1])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    ingest_node = cluster.add_node(num_cpus=2, resources={"ingest_cpu": 2})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        dicoms, tables = make_synthetic(str(out / "syn"), 3, 5)
        cfg = load("tiny_cpu", ["ingest.long_side=32", "ingest.studies_per_shard=1",
                                "ingest.resources={ingest_cpu: 1}", f"ingest.pseudonym_key=env:{sys.argv[2]}"])
        receipts = []
        summary = run_ingest(dicoms, str(out / "shards"), cfg, tables=tables, on_shard=receipts.append)
        (out / "result.json").write_text(json.dumps({
            "nodes": sorted({n for r in receipts for n in r["nodes"]}), "ingest_node": ingest_node.node_id,
            "head": cluster.head_node.node_id, "shards": summary.shards, "receipts": len(receipts)}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


@pytest.mark.slow
def test_ingest_resources_place_every_task_on_the_nodes_offering_them(tmp_path):
    script = tmp_path / "two_nodes.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), KEY_ENV: "placement test key 0123456789abcdef"}
    env.pop("RAY_ADDRESS", None)  # the subprocess starts its own cluster
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), KEY_ENV], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["shards"] == result["receipts"] == 3 and result["head"] != result["ingest_node"]
    # the head has free CPUs and is the driver's own node (Ray's first choice), yet nothing ran there
    assert result["nodes"] == [result["ingest_node"]]
