"""Helpers that run the pipeline in a throwaway copy of this repository, for tests and benchmarks.

NOTE: `make_project` copies the source checkout this module sits in, so it works from a git
clone (or an editable install), not from an installed wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COPIED = [
    "pgdpo", "stages", "flows", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", ".gitignore",
    "data/prompt_files",
]

# Reduced params: enough for every stage to do real work on a few prompts in a few minutes.
SMALL_PARAMS = {
    "base": {"vae_steps": 3, "transformer_steps": 6, "clips_per_prompt": 1},
    "generate": {"num_inference_steps": 3, "num_candidates": 2},
    "reward_model": {"steps": 20, "clips_per_prompt": 2, "eval_clips_per_prompt": 1},
    "label": {"min_margin": 0.0, "num_probe_pairs": 2},
    "train": {"steps": 4, "probe_every": 2, "batch_size": 2, "log_every": 1},
    "evaluate": {"num_inference_steps": 3, "num_videos_per_prompt": 2, "sheet_prompts": 2},
}


def project_env(project: Path) -> dict[str, str]:
    """Return the environment for running the project's CLIs: this interpreter's bin first, a local MLflow store."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    env.pop("PGDPO_PARENT_RUN_ID", None)
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1")
    env.setdefault("GIT_AUTHOR_NAME", "pgdpo-tests")
    env.setdefault("GIT_AUTHOR_EMAIL", "tests@example.invalid")
    env.setdefault("GIT_COMMITTER_NAME", "pgdpo-tests")
    env.setdefault("GIT_COMMITTER_EMAIL", "tests@example.invalid")
    return env


def run_cli(
    args: list[str], project: Path, check: bool = True, timeout: float = 900, env_overrides: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a command in `project`. On failure, show its output in the assertion message."""
    env = project_env(project) | (env_overrides or {})
    result = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def make_project(destination: Path, overrides: dict | None = None) -> Path:
    """Copy the project's code and config to `destination` as a fresh git repo with reduced params."""
    for name in COPIED:
        source = ROOT / name
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)

    params = yaml.safe_load((destination / "params.yaml").read_text())
    for section, values in {**SMALL_PARAMS, **(overrides or {})}.items():
        params[section].update(values)
    (destination / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    run_cli(["git", "init", "-q"], destination)
    run_cli(["git", "add", "-A"], destination)
    run_cli(["git", "commit", "-qm", "test project"], destination)
    return destination
