"""Prefect flow that runs the DVC pipeline stage by stage.

Each task runs `dvc repro --single-item <stage>`, so DVC still skips a stage whose inputs are
unchanged, and streams the stage's output into the Prefect log. The flow opens the MLflow
parent run and passes its id to every stage through `PGDPO_PARENT_RUN_ID`.

Run it with `python -m flows.pipeline` (ephemeral Prefect, no server needed) or against a
server started with `prefect server start` after `prefect config set PREFECT_API_URL=...`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger, task

from pgdpo.config import ParamsError, load_params
from pgdpo.stage import EXIT_INVALID_PARAMS

PROGRESS_INTERVAL_S = 15.0
STAGES = ("prompts", "base", "generate", "score", "label", "train", "evaluate_base", "evaluate")


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; `returncode` decides whether a retry can help."""

    def __init__(self, stage: str, returncode: int, tail: str):
        super().__init__(f"stage {stage} failed with exit code {returncode}:\n{tail}")
        self.stage = stage
        self.returncode = returncode


def should_retry(error: BaseException) -> bool:
    """Return False for invalid params, which fail the same way every time, else True."""
    if isinstance(error, StageFailed):
        return error.returncode != EXIT_INVALID_PARAMS
    return not isinstance(error, ParamsError)


def _is_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry a failed stage only when `should_retry` allows it."""
    try:
        state.result()
    except Exception as error:  # noqa: BLE001 - the state's own exception, re-raised by result()
        return should_retry(error)
    return False


@task(retries=1, retry_delay_seconds=5, retry_condition_fn=_is_transient, task_run_name="dvc repro {stage}")
def run_stage(stage: str, project_dir: str, env: dict[str, str]) -> None:
    """Run `dvc repro --single-item <stage>` and stream its output into the Prefect log."""
    logger = get_run_logger()
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    logger.info("running %s in %s", " ".join(command), project_dir)
    # DVC runs each stage's `python -m stages.<name>` through the shell, so this interpreter's
    # folder goes first on PATH for the stage to use the same environment as the flow.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    process = subprocess.Popen(
        command, cwd=project_dir, env={**os.environ, **env, "PATH": path}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, bufsize=1,
    )
    tail: list[str] = []
    last_progress = 0.0
    assert process.stdout is not None
    for line in process.stdout:
        line = line.rstrip().split("\r")[-1]
        if not line:
            continue
        tail = (tail + [line])[-40:]
        # Progress bars update many times a second; keep one update every PROGRESS_INTERVAL_S.
        if "%|" in line:
            if time.monotonic() - last_progress < PROGRESS_INTERVAL_S:
                continue
            last_progress = time.monotonic()
        logger.info("%s | %s", stage, line)
    returncode = process.wait()
    if returncode != 0:
        raise StageFailed(stage, returncode, "\n".join(tail))


@task(retries=2, retry_delay_seconds=5)
def open_parent_run(project_dir: str, experiment: str) -> str:
    """Create the MLflow parent run of this pipeline run and return its id."""
    import mlflow

    from pgdpo.tracking import git_commit, tracking_uri

    mlflow.set_tracking_uri(tracking_uri(project_dir))
    experiment_id = mlflow.set_experiment(experiment).experiment_id
    run = mlflow.MlflowClient().create_run(
        experiment_id, run_name="pipeline", tags={"git.commit": git_commit() or "unknown", "pgdpo.orchestrator": "prefect"}
    )
    return run.info.run_id


@task
def close_parent_run(project_dir: str, run_id: str, status: str) -> None:
    """Mark the MLflow parent run finished or failed."""
    import mlflow

    from pgdpo.tracking import tracking_uri

    mlflow.MlflowClient(tracking_uri(project_dir)).set_terminated(run_id, status=status)


@flow(name="pgdpo-pipeline", log_prints=False)
def pipeline(project_dir: str = ".", stages: list[str] | None = None) -> str:
    """Run the DVC stages in order (all by default) under one MLflow parent run; return its id."""
    project = str(Path(project_dir).resolve())
    experiment = load_params(Path(project) / "params.yaml").tracking.experiment
    parent = open_parent_run(project, experiment)
    env = {"PGDPO_PARENT_RUN_ID": parent}
    status = "FAILED"
    try:
        for stage in stages or STAGES:
            run_stage(stage, project, env)
        status = "FINISHED"
    finally:
        close_parent_run(project, parent, status)
    return parent


if __name__ == "__main__":
    pipeline()
