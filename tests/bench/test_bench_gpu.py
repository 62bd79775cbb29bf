"""bench/gpu.py without a GPU: the dry run prints the FLOP model's own numbers and the plan; the
CPU smoke run goes through the timed path (DeepSpeed engine and the plain engine, both phases)."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest

from mama_ray.models.flops import DEFAULT_SENTENCES, pair_flops

GPU_BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", GPU_BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _table(text: str) -> dict[str, list[float]]:
    return {m[0]: [float(x) for x in m[1].split(" | ")]
            for m in re.findall(r"^\| (\w+) \| ([\d.e+\- |]+) \|$", text, flags=re.M)}


def test_dry_run_prints_the_flop_model_and_the_plan(bench, capsys):
    assert bench.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    off, on = out.split("activation checkpointing on")
    for text, ckpt in ((off, False), (on, True)):
        cfg = bench.bench_config(bench.parse_args(["--dry-run"]), bench.Setting("ours", 2, ckpt))
        early, late = (pair_flops(cfg, late, DEFAULT_SENTENCES) for late in (False, True))
        rows = _table(text)
        assert set(rows) == {*early.components, "total"}
        for name, got in rows.items():
            e = early.total if name == "total" else early.components[name]
            lt = late.total if name == "total" else late.components[name]
            want = [x / 1e9 for x in (e.forward, e.backward, e.recompute, lt.forward, lt.backward, lt.recompute)]
            assert got == pytest.approx(want, rel=1e-3, abs=1e-12), name
        model = re.search(r"late: model ([\d.]+) TFLOP per pair .*hardware ([\d.]+) TFLOP", text)
        assert float(model[1]) == pytest.approx(late.total.model / 1e12, abs=5e-4)
        assert float(model[2]) == pytest.approx(late.total.hardware / 1e12, abs=5e-4)
        assert 3.0 < float(model[1]) < 4.0  # the estimate for base at 518 px, late phase
    assert "6 settings" in out and "2 warm-up + 3 timed optimizer steps of 2 × 36 pairs" in out
    names = ["ours zero2 ckptoff", "ours zero2 ckpton", "ours zero3 ckptoff", "ours zero3 ckpton",
             "plain ckptoff", "plain ckpton"]
    assert [ln.strip() for ln in out.splitlines() if ln.startswith("  ")] == names


@pytest.mark.slow
def test_cpu_smoke_times_both_engines_and_both_phases(bench):
    args = bench.parse_args(["--cpu-smoke", "--in-process", "--stages", "2", "--ckpt", "on"])
    results = bench.run_plan(args)
    assert [r["setting"] for r in results] == [{"loop": "ours", "zero": 2, "ckpt": True},
                                               {"loop": "plain", "zero": 0, "ckpt": True}]
    for r in results:
        assert "error" not in r, r["error"]
        for phase, m in r["phases"].items():
            # one timed step of one micro-batch of 4 pairs: pairs/s × step time = 4
            assert m["pairs_per_s"] * m["step_time_s"] == pytest.approx(4, rel=1e-6), phase
            assert 0 <= m["data_wait_frac"] < 0.5 and math.isfinite(m["loss"]) and m["peak_memory_gib"] > 0
    rows = [ln.split(" | ") for ln in bench.result_rows(args, results, peak=None)[2:]]
    assert [(r[0], r[3]) for r in rows] == [("| ours", "early"), ("| ours", "late"),
                                            ("| plain", "early"), ("| plain", "late")]
    cfg = bench.bench_config(args, bench.Setting("ours", 2, True))
    late = pair_flops(cfg, True, sentences=results[0]["sentences"]).total.model
    assert float(rows[1][8]) == pytest.approx(late / 1e12, rel=1e-3)  # the table's TFLOP/pair
    ours, plain = results[0]["phases"]["late"]["pairs_per_s"], results[1]["phases"]["late"]["pairs_per_s"]
    assert float(rows[1][-1].rstrip(" |")) == pytest.approx(ours / plain, abs=0.006)  # "vs plain"
    assert rows[3][-1] == "1.00 |" and rows[1][9] == "n/a"  # no peak on a CPU: no MFU


def test_table_mfu_ratio_and_an_oom_phase(bench):
    """MFU = pairs/s × the FLOP model's TFLOP/pair ÷ peak; a late-phase OOM keeps the early row."""
    args = bench.parse_args([])
    phase = {"step_time_s": 7.2, "pairs_per_s": 10.0, "data_wait_frac": 0.01, "peak_memory_gib": 70.0, "loss": 7.1}
    results = [
        {"setting": {"loop": "ours", "zero": 3, "ckpt": False}, "sentences": 10.0,
         "phases": {"early": phase}, "error": "OOM"},
        {"setting": {"loop": "plain", "zero": 0, "ckpt": False}, "sentences": 10.0,
         "phases": {"early": {**phase, "pairs_per_s": 12.5}, "late": phase}},
    ]
    rows = [ln.split(" | ") for ln in bench.result_rows(args, results, peak=989.0)[2:]]
    cfg = bench.bench_config(args, bench.Setting("ours", 3, False))
    early = pair_flops(cfg, False, sentences=10.0).total
    assert rows[0][3:6] == ["early", "7.200", "10.0"]
    assert rows[0][9] == f"{100 * 10.0 * early.model / 989e12:.1f}%" == "2.4%"  # 2.378 TFLOP/pair
    assert rows[0][-1] == "0.80 |"  # 10 / 12.5 pairs/s of the plain loop, same phase and setting
    assert rows[1][3:5] == ["late", "OOM"]
    assert rows[3][-1] == "1.00 |"
