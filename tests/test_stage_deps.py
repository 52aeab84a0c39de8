"""Every module a stage imports is a dependency of that stage in dvc.yaml.

DVC reruns a stage only when one of its deps changes. A stage that imports a `pgdpo` module
missing from its deps keeps its cached outputs after that module changes. The imports are read
from the source, including those inside functions, and followed through `pgdpo`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# Modules that change how a stage runs or reports, never what it writes: params validation
# (the params themselves are DVC params), output paths (also listed as outs), logging, MLflow
# tracking, process handling and the stage wrapper.
NO_OUTPUT_EFFECT = {
    "pgdpo/__init__.py",
    "pgdpo/config.py",
    "pgdpo/logs.py",
    "pgdpo/mlflow_model.py",
    "pgdpo/paths.py",
    "pgdpo/process.py",
    "pgdpo/stage.py",
    "pgdpo/tracking.py",
    "pgdpo/tracking_worker.py",
}


def module_file(name: str) -> Path | None:
    """Return the source file of `pgdpo` module `name` (a package's __init__.py), or None when no such module exists."""
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_files(source: Path) -> set[Path]:
    """Return the `pgdpo` files that `source` imports anywhere in its body, with their packages' __init__.py."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from pgdpo.x import y` may name a submodule y.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)

    files = set()
    for name in names:
        parts = name.split(".")
        if parts[0] != "pgdpo":
            continue
        # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
        for depth in range(1, len(parts) + 1):
            found = module_file(".".join(parts[:depth]))
            if found is not None:
                files.add(found)
    return files


def stage_imports(stage: str) -> set[str]:
    """Return the `pgdpo` files (relative POSIX paths) that stage `stage` reaches through its imports.

    The walk stops at modules in NO_OUTPUT_EFFECT: what they import (the losses that params
    validation lists, the model that MLflow logging wraps) does not reach the stage's outputs
    through them.
    """
    pending = [ROOT / "stages" / f"{stage}.py"]
    seen: set[Path] = set()
    while pending:
        source = pending.pop()
        if source in seen:
            continue
        seen.add(source)
        if relative(source) not in NO_OUTPUT_EFFECT:
            pending.extend(imported_files(source) - seen)
    return {relative(path) for path in seen if path.is_relative_to(ROOT / "pgdpo")}


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def test_imports_follow_lazy_and_submodule_imports():
    assert "pgdpo/models/compile.py" in stage_imports("generate")  # via pgdpo.generation -> pgdpo.models
    assert "pgdpo/losses/pgdpo.py" in stage_imports("train")
    assert "pgdpo/world/__init__.py" in stage_imports("prompts")


def test_stage_deps_cover_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, stage in stages.items():
        assert stage["cmd"].startswith(f"python -m stages {name}"), f"stage {name} runs {stage['cmd']!r}"
        deps = stage.get("deps", [])
        assert f"stages/{name}.py" in deps, f"stage {name}: its own module stages/{name}.py is not in its deps"
        uncovered = sorted(path for path in stage_imports(name) - NO_OUTPUT_EFFECT if not covered(path, deps))
        if uncovered:
            missing[name] = uncovered
    assert not missing, "dvc.yaml: stages import pgdpo modules missing from their deps; add them:\n" + "\n".join(
        f"  {name}: {', '.join(paths)}" for name, paths in missing.items()
    )
