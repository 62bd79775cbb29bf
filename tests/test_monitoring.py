"""The monitoring module's mapping (reported keys → series) and the Grafana dashboard that plots it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from mama_ray.monitoring import BY_NAME, SERIES, train_points

DASHBOARD = Path(__file__).resolve().parents[1] / "cluster" / "grafana" / "mama-ray.json"
REPORT = {"loss": 5.5, "clip_loss": 5.0, "clip2_loss": 0.25, "mv_loss": 0.5, "data_wait_frac": 0.25,
          "samples_per_s": 40.0, "step_time_s": 0.8, "step": 12, "epoch": 1, "lr": 1e-3, "lr_late": 5e-4,
          "logit_scale": 14.3, "local_scale": 10.0, "memory_mb": 900.0, "start_step": 0,
          "val_loss": 6.0, "val_retrieval_r1": 0.125, "mfu": 0.31, "grad_norm": 2.0}


def test_rank0_maps_every_reported_key():
    got = {(name, tuple(sorted(tags.items()))): v for name, tags, v in train_points(REPORT, rank=0, world_size=4, eta_s=30.0)}
    assert got == {
        ("mama_ray_train_loss", (("term", "loss"),)): 5.5,
        ("mama_ray_train_loss", (("term", "clip_loss"),)): 5.0,
        ("mama_ray_train_loss", (("term", "clip2_loss"),)): 0.25,
        ("mama_ray_train_loss", (("term", "mv_loss"),)): 0.5,
        ("mama_ray_train_data_wait_fraction", ()): 0.25,
        ("mama_ray_train_samples_per_s", ()): 40.0,
        ("mama_ray_train_pairs_per_s", ()): 10.0,  # per device: a pair is a sample, 40 samples/s over 4 ranks
        ("mama_ray_train_step_seconds", ()): 0.8,
        ("mama_ray_train_steps", ()): 12.0,
        ("mama_ray_train_epoch", ()): 1.0,
        ("mama_ray_train_lr", (("group", "main"),)): 1e-3,
        ("mama_ray_train_lr", (("group", "late"),)): 5e-4,
        ("mama_ray_train_scale", (("which", "logit"),)): 14.3,
        ("mama_ray_train_scale", (("which", "local"),)): 10.0,
        ("mama_ray_train_peak_memory_mib", ()): 900.0,
        ("mama_ray_val_metric", (("key", "loss"),)): 6.0,  # val_loss is a validation metric, not a train loss
        ("mama_ray_val_metric", (("key", "retrieval_r1"),)): 0.125,
        ("mama_ray_train_mfu", ()): 0.31,
        ("mama_ray_train_value", (("key", "grad_norm"),)): 2.0,  # a key nobody mapped still shows up
        ("mama_ray_train_eta_seconds", ()): 30.0,
    }


def test_other_ranks_publish_only_what_differs_by_rank():
    got = {name: v for name, _, v in train_points(REPORT, rank=3, world_size=4, eta_s=30.0)}
    assert got == {"mama_ray_train_step_seconds": 0.8, "mama_ray_train_peak_memory_mib": 900.0}


def test_one_rank_pairs_are_the_samples_and_no_eta_without_one():
    early = {"loss": 6.0, "clip_loss": 6.0, "samples_per_s": 40.0}
    got = {name: v for name, _, v in train_points(early, rank=0)}
    assert got["mama_ray_train_pairs_per_s"] == 40.0 and "mama_ray_train_eta_seconds" not in got


def test_series_names_are_valid_and_prefixed():
    for s in SERIES:
        assert re.fullmatch(r"mama_ray_[a-z0-9_]+", s.name), s.name
        assert s.kind in ("gauge", "counter")
        assert s.help.isascii(), s.name  # Ray encodes descriptions as ASCII (a '≈' failed the worker)
        assert s.prometheus_name == "ray_" + s.name + ("_total" if s.kind == "counter" else "")
        if s.group in ("rank", "data"):
            assert "rank" in s.tags, s.name


def _exprs(panel: dict) -> list[str]:
    return [t["expr"] for t in panel.get("targets", [])]


def test_grafana_dashboard_plots_exactly_the_exported_series():
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    referenced = {m for p in panels for e in _exprs(p) for m in re.findall(r"\bray_mama_ray_[a-z0-9_]+", e)}
    exported = {s.prometheus_name for s in SERIES}
    assert referenced <= exported, referenced - exported  # no panel queries a series the code never exports
    assert referenced == exported, exported - referenced  # and every exported series has a panel
    # One row per group, each with at least one panel under it.
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert len(rows) == len({s.group for s in SERIES})
    by_group = {s.group: set() for s in SERIES}
    for p in panels:
        for e in _exprs(p):
            for m in re.findall(r"\bray_mama_ray_[a-z0-9_]+", e):
                name = m.removeprefix("ray_").removesuffix("_total")
                by_group[BY_NAME[name].group].add(p["title"])
    assert all(by_group.values()), by_group


def test_grafana_dashboard_uses_rays_datasource_and_session_variables():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"SessionName", "run"} <= set(variables)
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"] == "${datasource}", p["title"]
            for e in _exprs(p):
                assert 'SessionName=~"$SessionName"' in e, (p["title"], e)


def test_runs_start_with_train_state_tracking_unless_switched_off(tmp_path, monkeypatch):
    """The dashboard's Train page needs Ray Train's state actor, which Ray 2.60 starts only on "1"."""
    from mama_ray import config
    from mama_ray.train.launch import STATE_TRACKING_ENV, build_trainer

    cfg = config.load("tiny_cpu", {"storage.run_dir": str(tmp_path)})
    monkeypatch.delenv(STATE_TRACKING_ENV, raising=False)  # restored after the test
    build_trainer(cfg)
    assert os.environ[STATE_TRACKING_ENV] == "1"  # read by TorchTrainer.fit() in this process
    monkeypatch.setenv(STATE_TRACKING_ENV, "0")
    build_trainer(cfg)
    assert os.environ[STATE_TRACKING_ENV] == "0"
