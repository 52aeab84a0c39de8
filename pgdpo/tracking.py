"""MLflow tracking: one child run per stage under one parent run per pipeline run.

The parent run is found in this order:
1. `PGDPO_PARENT_RUN_ID`, set by the Prefect flow, which creates the parent itself;
2. the `dvc repro` / `dvc exp run` process that started this stage: every stage of one DVC
   invocation shares that process, so its pid and start time key the parent run;
3. none: a stage started by hand logs a top-level run.

The tracking URI is `MLFLOW_TRACKING_URI` when set, else `sqlite:///mlflow.db` in the
current folder (the project root when DVC runs a stage).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

logger = logging.getLogger(__name__)

PARENT_ENV = "PGDPO_PARENT_RUN_ID"
PIPELINE_KEY_TAG = "pgdpo.pipeline_key"
STAGE_TAG = "pgdpo.stage"


def tracking_uri(project_dir: str | Path | None = None) -> str:
    """Return `MLFLOW_TRACKING_URI`, else the sqlite store `mlflow.db` in `project_dir` (default: cwd)."""
    root = Path(project_dir) if project_dir is not None else Path.cwd()
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root.resolve() / 'mlflow.db'}"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise ConnectionError if an http(s) tracking server does not respond on its /health endpoint.

    MLflow's own client retries a refused connection for minutes; this check fails in seconds.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            if response.status != 200:
                raise ConnectionError(f"{uri}/health returned HTTP {response.status}")
    except (OSError, urllib.error.URLError) as error:
        raise ConnectionError(f"MLflow tracking server {uri} is unreachable: {error}") from error


def git_commit() -> str | None:
    """Return the current git commit, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def dvc_invocation_key() -> str | None:
    """Return "pid-start_time" of the nearest `dvc` ancestor process, or None if there is none."""
    try:
        process = psutil.Process().parent()
        while process is not None:
            cmdline = " ".join(process.cmdline())
            if "dvc" in Path(process.exe()).name or " dvc " in f" {cmdline} " or "/dvc " in cmdline:
                return f"{process.pid}-{int(process.create_time() * 1000)}"
            process = process.parent()
    except (psutil.Error, OSError):
        return None
    return None


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys, e.g. {"lora": {"rank": 8}} -> {"lora.rank": 8}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class Tracker:
    """Thin wrapper over the active MLflow run; a disabled tracker drops every call."""

    def __init__(self, run_id: str | None):
        self.run_id = run_id

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    def log_params(self, params: dict[str, Any]) -> None:
        if self.enabled:
            import mlflow

            flat = {key: ("null" if value is None else value) for key, value in flatten(params).items()}
            mlflow.log_params(flat)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_metrics({key: float(value) for key, value in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            import mlflow

            if Path(path).is_dir():
                mlflow.log_artifacts(str(path), artifact_path=artifact_path)
            else:
                mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            import mlflow

            mlflow.set_tags(tags)


def find_or_create_parent(client, experiment_id: str, key: str) -> str:
    """Return the id of the pipeline parent run tagged with `key`, creating it if needed."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PIPELINE_KEY_TAG}` = '{key}'", max_results=1
    )
    if runs:
        return runs[0].info.run_id
    run = client.create_run(experiment_id, run_name="pipeline", tags={PIPELINE_KEY_TAG: key})
    logger.info("created MLflow parent run %s for pipeline %s", run.info.run_id, key)
    return run.info.run_id


@contextlib.contextmanager
def stage_run(stage: str, experiment: str, params: dict[str, Any], required: bool = True) -> Iterator[Tracker]:
    """Open the MLflow child run of `stage`, log `params` and the git commit, and yield a Tracker.

    With `required=False`, an unreachable tracking server logs one warning and the stage runs
    with a disabled tracker, so its DVC outputs are still written.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    try:
        check_reachable(uri)
        mlflow.set_tracking_uri(uri)
        experiment_id = mlflow.set_experiment(experiment).experiment_id
        client = MlflowClient()
        parent_id = os.environ.get(PARENT_ENV)
        if not parent_id:
            key = dvc_invocation_key()
            parent_id = find_or_create_parent(client, experiment_id, key) if key else None
        run = mlflow.start_run(run_name=stage, parent_run_id=parent_id, tags={STAGE_TAG: stage})
    except Exception as error:  # noqa: BLE001 - any client error means the store is unusable
        if required:
            raise RuntimeError(
                f"MLflow tracking at {uri} failed for stage {stage}: {error}. Start the server or set "
                "MLFLOW_TRACKING_URI, or set tracking.required: false to run without tracking."
            ) from error
        logger.warning("MLflow at %s unreachable (%s); stage %s runs without tracking", uri, error, stage)
        yield Tracker(None)
        return

    tracker = Tracker(run.info.run_id)
    commit = git_commit()
    tracker.set_tags({"git.commit": commit or "unknown"})
    tracker.log_params(params)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        mlflow.end_run(status=status)
        if parent_id and not os.environ.get(PARENT_ENV):
            client.set_terminated(parent_id, status=status)
