"""The dashboard's view of a submitted run: our Prometheus series and the Train page.

One `ray job submit -- python jobs/pretrain.py` on a real `ray start --head` (the job-submit
test's :class:`Head`) with a fresh cache, so the job first ingests the synthetic set in its driver
and then trains. While it runs, the node's metrics endpoint is scraped (series vanish soon after
their process exits); afterwards the scraped values are held against the run's ``metrics.jsonl``
and the ingest's ``manifest.json``, and the dashboard's Train API is asked for the run.
"""

from __future__ import annotations

import json
import sys
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mama_ray.monitoring import BY_NAME
from tests.cluster.test_cluster_job_submit import PRETRAIN, Head

pytestmark = [pytest.mark.slow, pytest.mark.integration]
RUN = "metrics-run"
MICRO, STEPS = 2, 60  # ≈ 8 steps/s measured on the loaded 2-core machine: several 1-s exports fall in training


def _name(series: str) -> str:
    return BY_NAME[series].prometheus_name


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The node's metrics endpoint as ``{sample name: [(labels, value), …]}`` (ours only)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_mama_ray_"):
                out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(scraped: dict, series: str, **labels: str) -> float | None:
    hits = [v for lab, v in scraped.get(_name(series), []) if all(lab.get(k) == x for k, x in labels.items())]
    assert len(hits) <= 1, (series, labels, hits)
    return hits[0] if hits else None


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    # Series every second instead of every 10 s; the Train page's state tracking left to our default.
    with Head(tmp_path_factory.mktemp("head"), {"RAY_metrics_report_interval_ms": "1000",
                                                "RAY_TRAIN_ENABLE_STATE_TRACKING": None}) as h:
        yield h


@pytest.fixture(scope="module")
def submitted(head, tmp_path_factory):
    """Submit the run, scrape while it is alive, return ``(scrapes, run dir, shard dir)``."""
    tmp = tmp_path_factory.mktemp("job")
    entry = [sys.executable, PRETRAIN, "--config", "tiny_cpu", "--set", f"run.name={RUN}",
             "--set", f"storage.run_dir={tmp / 'runs'}", "--set", f"storage.cache_dir={tmp / 'cache'}",
             "--set", "data.synthetic_studies=16", "--set", f"train.max_steps={STEPS}",
             "--set", "optim.warmup_steps=1", "--set", "loss.late_loss_step=4",
             "--set", f"train.checkpoint_every={STEPS}", "--set", "train.log_every=1",
             "--set", f"train.micro_batch_size={MICRO}", "--set", "train.eval_at_end=false",
             "--set", "train.max_failures=0"]
    done = head.submit("metrics-job", entry, wait=False, timeout_s=120)
    assert done.returncode == 0, done.stderr[-3000:]
    scrapes, stop = [], threading.Event()

    def scraper():  # every 0.2 s, beside the status polls (each `ray job status` takes a second or more)
        while not stop.wait(0.2):
            if scraped := scrape(head.metrics_port):
                scrapes.append(scraped)

    thread = threading.Thread(target=scraper, daemon=True)
    thread.start()
    try:
        state = head.wait("metrics-job", timeout_s=600)[0]
    finally:
        stop.set()
        thread.join()
    (tmp / "scrapes.json").write_text(json.dumps(scrapes))  # to read when an assertion fails
    logs = head.cli("job", "logs", "metrics-job").stdout
    assert state == "succeeded", logs[-4000:]
    shards = next((tmp / "cache").glob("synthetic-*")) / "shards"
    return scrapes, tmp / "runs" / RUN, shards


def test_training_series_agree_with_metrics_jsonl(submitted):
    scrapes, run_dir, _ = submitted
    logged = {int(r["step"]): r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert sorted(logged) == list(range(1, STEPS + 1))
    seen = {}  # step → scraped (loss, clip_loss, samples/s, lr)
    for s in scrapes:
        step = value(s, "mama_ray_train_steps", run=RUN)
        if step is None:
            continue
        got = (value(s, "mama_ray_train_loss", run=RUN, term="loss"),
               value(s, "mama_ray_train_loss", run=RUN, term="clip_loss"),
               value(s, "mama_ray_train_samples_per_s", run=RUN), value(s, "mama_ray_train_lr", run=RUN, group="main"))
        want = tuple(logged[int(step)][k] for k in ("loss", "clip_loss", "samples_per_s", "lr"))
        if got == pytest.approx(want, rel=1e-9):
            seen[int(step)] = got
        # The late terms appear with their step (loss.late_loss_step=4: from the 5th step on).
        if int(step) >= 6:
            assert value(s, "mama_ray_train_loss", run=RUN, term="mv_loss") is not None
        if got == pytest.approx(want, rel=1e-9):  # pairs per device: 2 workers
            assert value(s, "mama_ray_train_pairs_per_s", run=RUN) == pytest.approx(got[2] / 2, rel=1e-9)
    # A scrape can fall between two gauges' updates, but most must agree, at several steps.
    assert len(seen) >= 2, f"no scrape agreed with metrics.jsonl; steps scraped: {sorted(seen)}"
    # Each worker's gauges vanish on their own once it exits: look at scrapes that hold both ranks.
    both = [[value(s, "mama_ray_train_peak_memory_mib", run=RUN, rank=r) for r in ("0", "1")] for s in scrapes]
    both = [m for m in both if None not in m]
    assert both, "no scrape held both ranks' peak memory"
    assert min(both[-1]) > 50  # MiB: each is a torch process


def test_data_series_count_each_ranks_samples(submitted):
    scrapes, _, _ = submitted
    last = {}
    for s in scrapes:
        step = value(s, "mama_ray_train_steps", run=RUN)
        delivered = value(s, "mama_ray_data_samples", run=RUN, rank="0")
        if step is not None and delivered is not None:
            # Rank 0 counts a batch before it trains on it; both series leave its process together.
            assert delivered >= MICRO * step
        for rank in ("0", "1"):
            n = value(s, "mama_ray_data_samples", run=RUN, rank=rank)
            if n is not None:
                assert n % MICRO == 0 and n <= MICRO * STEPS
                last[rank] = n
    assert set(last) == {"0", "1"}
    first = [v for s in scrapes for lab, v in s.get(_name("mama_ray_data_first_batch_seconds"), [])
             if lab["run"] == RUN and lab["epoch"] == "0"]
    assert first and all(v > 0 for v in first)


def test_ingest_counters_add_up_to_the_manifest(submitted):
    scrapes, _, shards = submitted
    counts = json.loads((shards / "manifest.json").read_text())["counts"]
    ds = str(shards)
    last = next(s for s in reversed(scrapes) if value(s, "mama_ray_ingest_images", dataset=ds) is not None)
    assert value(last, "mama_ray_ingest_images", dataset=ds) == counts["images"]
    assert value(last, "mama_ray_ingest_shards", dataset=ds) == counts["shards"]
    manifest = json.loads((shards / "manifest.json").read_text())
    assert value(last, "mama_ray_ingest_bytes", dataset=ds) == sum(s["bytes"] for s in manifest["shards"])
    by_reason = {lab["reason"]: v for lab, v in last.get(_name("mama_ray_ingest_quarantined"), []) if lab["dataset"] == ds}
    assert by_reason == counts["quarantine_reasons"] and sum(by_reason.values()) == counts["quarantined"] > 0


def test_train_page_lists_the_run(head, submitted):
    req = urllib.request.Request(f"{head.address}/api/train/v2/runs/v1",
                                 headers={"Authorization": f"Bearer {head.token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        runs = json.loads(r.read())["train_runs"]
    mine = [r for r in runs if r["name"] == RUN]
    assert len(mine) == 1, [r["name"] for r in runs]
    assert mine[0]["status"] == "FINISHED"
    attempts = mine[0]["attempts"]
    assert len(attempts) == 1 and sorted(w["world_rank"] for w in attempts[0]["workers"]) == [0, 1]


def test_prometheus_names_are_what_the_endpoint_serves(submitted):
    scrapes = submitted[0]
    served = {name for s in scrapes for name in s}
    expected = {BY_NAME[n].prometheus_name for n in (
        "mama_ray_train_loss", "mama_ray_train_samples_per_s", "mama_ray_data_samples",
        "mama_ray_data_wait_seconds", "mama_ray_ingest_images", "mama_ray_ingest_quarantined")}
    assert expected <= served, sorted(served)
    assert served <= {s.prometheus_name for s in BY_NAME.values()}

