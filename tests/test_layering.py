"""The package's layers point down only (docs/architecture.md, "Layers").

Every import of every module under ``mama_ray/``, ``jobs/`` and ``tune/`` — module-level and
function-local, absolute and relative — is mapped to the layer of the module it names:

    0  mama_ray.config, .storage, .runtime, .monitoring, .errors   (no other mama_ray layer)
    1  mama_ray.dicom
    2  mama_ray.data
    3  mama_ray.models, .losses, .layout (run folder / checkpoint layout), .eval_metrics,
       .schedule
    4  mama_ray.train, .eval, .export                              (siblings: never each other)
    5  mama_ray.driver, .sweep, .search_spaces                     (driver-side orchestration)
    6  mama_ray.jobs (jobs/), mama_ray.tune (tune/)                (entry points)

A module may import its own layer or a lower one; in layer 4 a package may not import another
layer-4 package. A failure names ``file:line`` of each offending import.

Function-local imports are allowed only with a reason. The rule, kept simple: a function-local
import of a ``mama_ray`` module or of a heavy library (:data:`HEAVY`) must carry a comment on
its own line or on the line directly above the import block it belongs to (consecutive import
lines). Optional dependencies and start-up time are the usual reasons; anything else belongs at
module level.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

LAYERS: dict[str, int] = {
    "mama_ray.config": 0, "mama_ray.storage": 0, "mama_ray.runtime": 0, "mama_ray.monitoring": 0,
    "mama_ray.errors": 0,
    "mama_ray.dicom": 1,
    "mama_ray.data": 2,
    "mama_ray.models": 3, "mama_ray.losses": 3, "mama_ray.layout": 3, "mama_ray.eval_metrics": 3,
    "mama_ray.schedule": 3,
    "mama_ray.train": 4, "mama_ray.eval": 4, "mama_ray.export": 4,
    "mama_ray.driver": 5, "mama_ray.sweep": 5, "mama_ray.search_spaces": 5,
    "mama_ray.jobs": 6, "mama_ray.tune": 6,
}
SIBLINGS_APART = 4  # the layer whose packages must not import each other
HEAVY = ("torch", "ray", "deepspeed", "transformers", "peft", "safetensors", "tokenizers", "sklearn",
         "matplotlib", "cv2", "pyarrow", "pandas", "boto3", "botocore", "optuna", "pydicom", "yaml",
         "moto", "tensorboard")


def module_name(path: Path) -> str:
    """Dotted name of a source file, with jobs/ and tune/ as installed (mama_ray.jobs, mama_ray.tune)."""
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("jobs", "tune"):
        parts = ["mama_ray", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_key(name: str) -> str | None:
    """The :data:`LAYERS` key a dotted module name falls under (None: not a mama_ray module)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return ".".join(parts[:n])
    if name == "mama_ray":
        return "mama_ray"
    if name.startswith("mama_ray."):
        raise AssertionError(f"{name}: a mama_ray module without a layer; add it to LAYERS")
    return None


def imported_modules(tree: ast.AST, module: str, is_package: bool):
    """``(line, dotted name, function-local)`` of every import in ``tree``; relative ones resolved.

    ``from mama_ray import storage`` counts as an import of ``mama_ray.storage``.
    """
    local_nodes = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            local_nodes.update(id(n) for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom))
    for node in ast.walk(tree):
        local = id(node) in local_nodes
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, local
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield node.lineno, full if layer_key(full) not in (None, "mama_ray") else base, local


def upward_edges(source: str, module: str, is_package: bool = False, where: str = "<src>") -> list[str]:
    """``file:line: importer -> imported`` for every import that points up or across layer 4."""
    mine = layer_key(module)
    out = []
    for line, name, _ in imported_modules(ast.parse(source), module, is_package):
        theirs = layer_key(name)
        if theirs in (None, "mama_ray") or theirs == mine:
            continue
        up = LAYERS[theirs] > LAYERS[mine]
        across = LAYERS[theirs] == LAYERS[mine] == SIBLINGS_APART
        if up or across:
            out.append(f"{where}:{line}: {module} (layer {LAYERS[mine]}) imports {name} (layer {LAYERS[theirs]})")
    return out


def unexplained_local_imports(source: str, where: str = "<src>", module: str = "x", is_package: bool = False) -> list[str]:
    """``file:line`` of function-local imports of mama_ray or :data:`HEAVY` modules without a comment."""
    lines = source.splitlines()
    out, seen = [], set()
    for line, name, local in imported_modules(ast.parse(source), module, is_package):
        if not local or not (name.startswith("mama_ray") or name.split(".")[0] in HEAVY):
            continue
        if line not in seen and not _has_reason(lines, line - 1):
            seen.add(line)
            out.append(f"{where}:{line}: function-local import of {name} without a '# why' comment")
    return out


def _has_reason(lines: list[str], i: int) -> bool:
    """A comment on line ``i``, or on the line above the run of import lines that ``i`` is in."""
    if "#" in lines[i]:
        return True
    j = i - 1
    while j >= 0 and (lines[j].strip().startswith(("from ", "import ", ")")) or not lines[j].strip()
                      or lines[j].startswith("        ") and lines[j].strip().endswith(",")):
        if "#" in lines[j]:
            return True
        j -= 1
    return j >= 0 and lines[j].strip().startswith("#")


def sources() -> list[Path]:
    return sorted(p for d in ("mama_ray", "jobs", "tune") for p in (REPO / d).rglob("*.py"))


def _checked(fn) -> list[str]:
    out = []
    for path in sources():
        where = str(path.relative_to(REPO))
        out += fn(path.read_text(), where=where, module=module_name(path), is_package=path.name == "__init__.py")
    return out


def test_no_module_imports_a_layer_above_it():
    bad = _checked(lambda src, where, module, is_package: upward_edges(src, module, is_package, where))
    assert not bad, "imports that point up the layers:\n" + "\n".join(bad)


def test_function_local_imports_say_why():
    bad = _checked(unexplained_local_imports)
    assert not bad, "function-local imports without a reason:\n" + "\n".join(bad)


def test_every_package_module_has_a_layer():
    for path in sources():
        assert layer_key(module_name(path)) is not None, path


# ---- the checks themselves can fail -------------------------------------------------------


def test_an_upward_edge_is_found_with_its_line():
    src = "import numpy\nfrom mama_ray import storage\n\ndef f():\n    from mama_ray.train.loop import x\n"
    assert upward_edges(src, "mama_ray.data.samples", where="d.py") == [
        "d.py:5: mama_ray.data.samples (layer 2) imports mama_ray.train.loop.x (layer 4)"]


def test_a_relative_import_is_resolved():
    assert upward_edges("from ..eval import runner\n", "mama_ray.data.samples", where="d.py") == [
        "d.py:1: mama_ray.data.samples (layer 2) imports mama_ray.eval.runner (layer 4)"]
    assert upward_edges("from . import captions\n", "mama_ray.data", is_package=True) == []


def test_layer_four_siblings_may_not_import_each_other():
    assert upward_edges("from mama_ray import eval\n", "mama_ray.train.validate", where="v.py") == [
        "v.py:1: mama_ray.train.validate (layer 4) imports mama_ray.eval (layer 4)"]
    assert upward_edges("from mama_ray.train import checkpoint\n", "mama_ray.train.loop") == []
    assert upward_edges("from mama_ray.eval.runner import run_zero_shot\n", "mama_ray.driver") == []


def test_downward_and_third_party_imports_pass():
    src = "import torch\nfrom mama_ray.config import Config\nfrom mama_ray.data import captions\n"
    assert upward_edges(src, "mama_ray.models.text") == []


def test_a_local_import_needs_a_comment():
    src = ("def f():\n    import torch\n\n"
           "def g():\n    # why: optional\n    import optuna\n    from mama_ray.data import plan\n\n"
           "def h():\n    import json\n\n"
           "def k():\n    from mama_ray.eval import runner  # why: start-up\n")
    assert unexplained_local_imports(src, "s.py") == [
        "s.py:2: function-local import of torch without a '# why' comment"]


def test_an_unknown_mama_ray_module_is_an_error():
    with pytest.raises(AssertionError, match="without a layer"):
        layer_key("mama_ray.newthing")
