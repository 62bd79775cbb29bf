"""Logging, progress lines, ``--help`` and the console entry points of the jobs (mama_ray.runtime)."""

from __future__ import annotations

import ast
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mama_ray import runtime

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_progress_line_has_rate_and_eta(caplog):
    now = [0.0]
    logger = logging.getLogger("mama_ray.test_progress")
    p = runtime.Progress("linear probe steps", 100, logger, every_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="mama_ray.test_progress"):
        for _ in range(25):
            now[0] += 0.4  # 25 steps in 10 s: 30 s left for the other 75
            p.update()
        p.detail = "density 10%"
        for _ in range(75):
            now[0] += 2.0
            p.update()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "linear probe steps: 25/100 (25%) 10s elapsed, ETA 30s"
    assert lines[-1] == "linear probe steps [density 10%]: 100/100 (100%) 2m 40s elapsed, ETA 0s"
    assert len(lines) == 1 + 15  # every 10 s (5 steps of 2 s) after the first line, the last included


def _console_threshold(name: str) -> int:
    """The lowest level a logger's records reach a console (non-file) handler at.

    Once Ray Data has configured itself its logger stays at DEBUG for its session log file and
    only the console handler is raised, so the logger's own level alone says nothing.
    """
    logger, level, found = logging.getLogger(name), logging.getLogger(name).getEffectiveLevel(), []
    while logger is not None:
        found += [max(level, h.level) for h in logger.handlers
                  if isinstance(h, logging.StreamHandler) and "File" not in type(h).__name__]
        if not logger.propagate:
            break
        logger = logger.parent
    return min(found) if found else level


def test_setup_logging_levels_ours_and_third_party():
    from ray.data._internal import logging as ray_data_logging

    ray_data_logging.configure_logging()  # as after any Ray Data use in this process (CI's order)
    try:
        assert runtime.setup_logging("warning") == logging.WARNING
        assert not logging.getLogger("mama_ray.export.hf").isEnabledFor(logging.INFO)
        runtime.setup_logging("info")
        assert logging.getLogger("mama_ray.export.hf").isEnabledFor(logging.INFO)
        for name in ("DeepSpeed", "transformers", "urllib3", "ray.data", "botocore"):
            assert _console_threshold(name) == logging.WARNING, name
        runtime.setup_logging("debug")
        assert logging.getLogger("transformers").getEffectiveLevel() == logging.INFO
        with pytest.raises(ValueError, match="choose from debug, info, warning, error"):
            runtime.log_level("loud")
    finally:
        runtime.setup_logging("info")


def _examples(path: Path) -> list[str]:
    """The indented command lines of a job's docstring (its usage examples)."""
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
    return [line.strip() for line in doc.splitlines() if line.startswith("    ") and line.strip()]


def _scripts() -> dict[str, Path]:
    """Console script → the file its module is, via [tool.setuptools.package-dir]."""
    dirs = PYPROJECT["tool"]["setuptools"]["package-dir"]
    out = {}
    for name, target in PYPROJECT["project"]["scripts"].items():
        module, func = target.split(":")
        package, leaf = module.rsplit(".", 1)
        assert func == "cli"
        out[name] = REPO / dirs[package] / f"{leaf}.py"
    return out


def test_every_job_has_a_console_script():
    files = {p.name for p in _scripts().values()}
    jobs = {p.name for p in (REPO / "jobs").glob("*.py") if p.name != "__init__.py"}
    assert files == jobs | {"sweep.py"}


@pytest.mark.parametrize("script", sorted(_scripts()))
def test_help_shows_the_examples_as_script_and_as_file(script):
    path = _scripts()[script]
    examples = _examples(path)
    assert any(e.startswith(script) for e in examples) and any(e.startswith("python ") for e in examples)
    # the console script's function, as the installed wrapper calls it (argv[0] = the command)
    code = (f"import runpy, sys; sys.argv = [{script!r}, '--help']; "
            f"runpy.run_path({str(path)!r})['cli']()")
    as_script = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    as_file = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120)
    for run, prog in ((as_script, script), (as_file, path.name)):
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.startswith(f"usage: {prog}") and "--log-level" in run.stdout
        for line in examples:
            assert line in run.stdout, line


@pytest.mark.parametrize("script", sorted(_scripts()))
def test_a_job_run_without_the_package_says_how_to_install_it(script):
    # -S: no site-packages, so neither the editable install nor anything else is importable;
    # the job must stop at its guard (exit 2, one line) instead of a traceback from an import.
    path = _scripts()[script]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-S", str(path), "--help"], capture_output=True, text=True,
                         timeout=60, cwd=REPO, env=env)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == "error: mama_ray is not installed; run `pip install -e .` in the checkout (README.md)\n"


def test_every_subpackage_is_installed():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "mama_ray").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"


def test_ray_train_file_named_loggers_are_held_at_warning():
    import ray.train.v2._internal.execution.context as train_context

    try:
        runtime.setup_logging("info")
        # Ray Train names this logger by its file path; at INFO it logs every report's metrics.
        assert not logging.getLogger(train_context.__file__).isEnabledFor(logging.INFO)
        runtime.setup_logging("debug")
        assert logging.getLogger(train_context.__file__).isEnabledFor(logging.INFO)
    finally:
        runtime.setup_logging("info")


def test_progress_line_is_written_once_under_ray_trains_print_patch(capsys, caplog, monkeypatch):
    import builtins

    from ray.train.v2._internal.logging.patch_print import redirected_print

    from mama_ray.train.metrics import print_progress

    monkeypatch.setattr(builtins, "print", redirected_print)  # what a Ray Train worker runs with
    with caplog.at_level(logging.INFO):
        print_progress("step 1/2 (50%) loss 1.0000")
    assert capsys.readouterr().out == "step 1/2 (50%) loss 1.0000\n"
    assert not [r for r in caplog.records if "step 1/2" in r.getMessage()]  # not also logged
