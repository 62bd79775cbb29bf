"""``jobs/export.py`` end to end: results on stdout, log lines on stderr at ``--log-level``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

JOB = Path(__file__).resolve().parents[2] / "jobs" / "export.py"


def _export(checkpoint: str, out: Path, level: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(JOB), "--checkpoint", checkpoint, "--out", str(out),
                           "--log-level", level], capture_output=True, text=True, timeout=300)


def test_log_level_warning_silences_our_info_lines(tiny_checkpoint, tmp_path):
    info = _export(tiny_checkpoint, tmp_path / "a", "info")
    quiet = _export(tiny_checkpoint, tmp_path / "b", "warning")
    for run in (info, quiet):
        assert run.returncode == 0, run.stderr[-3000:]
        result = run.stdout.splitlines()[-1]  # (DeepSpeed's own handler may print above it)
        assert result.startswith("exported ") and "README.md" in result
    assert "INFO mama_ray.export.hf: loaded " in info.stderr
    assert "INFO mama_ray.export.hf: writing the export to" in info.stderr
    assert " INFO " not in quiet.stderr and "mama_ray" not in quiet.stderr
    # third-party loggers stay at warning even at info
    assert not [ln for ln in info.stderr.splitlines() if " INFO " in ln and " mama_ray." not in ln]
