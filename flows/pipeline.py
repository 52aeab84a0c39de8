"""Prefect flow that runs the DVC pipeline stage by stage.

Each task runs `dvc repro --single-item <stage>`, so DVC still skips a stage whose inputs are
unchanged, and streams the stage's output into the Prefect log. The flow opens the MLflow
parent run and passes its id to every stage through `PGDPO_PARENT_RUN_ID`. One `dvc status` call
at the start skips the leading stages that are up to date, so a run with nothing to do takes
seconds.

When more than one stage runs, the stages run in processes forked from a stage server
(`pgdpo/stage_server.py`), which imports torch, diffusers and mlflow once for all of them;
`--no-stage-server` turns it off.

Every stage task has a timeout (`DEFAULT_TIMEOUTS_S`, overridden per stage by the flow parameter
`stage_timeouts`); a stage that runs past it is stopped with its whole process group and is not
retried. At the end the flow publishes two Prefect artifacts: `pipeline-report` (reports/eval.md
plus the MLflow run ids, links for an http tracking server) and `pairs-summary` (a table of pair
counts and reward margins from data/pairs/pairs.csv).

Run it with `python -m flows.pipeline` (ephemeral Prefect, no server needed) or against a
server started with `prefect server start` after `prefect config set PREFECT_API_URL=...`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from prefect import flow, get_run_logger, task

from pgdpo.config import ParamsError, load_params
from pgdpo.process import freeze_before_exit
from pgdpo.stage import EXIT_INVALID_PARAMS
from pgdpo.stage_server import stage_server
from pgdpo.suites import check_prompt_files

PROGRESS_INTERVAL_S = 15.0
# Per-stage task timeouts in seconds, sized for a real model on one GPU; the shapes world needs
# minutes. Stages missing here get DEFAULT_TIMEOUT_S.
DEFAULT_TIMEOUT_S = 4 * 3600.0
DEFAULT_TIMEOUTS_S = {
    "base": 24 * 3600.0,
    "generate": 12 * 3600.0,
    "train": 24 * 3600.0,
    "evaluate_base": 12 * 3600.0,
    "evaluate": 12 * 3600.0,
}
# Seconds a stopped stage gets to exit after SIGTERM before SIGKILL.
STOP_GRACE_S = 10.0
STAGES = ("prompts", "base", "generate", "reward_model", "score", "label", "train", "evaluate_base", "evaluate")


# DVC exits 255 when a stage command fails and reports the command's own exit code in this line.
DVC_EXIT_LINE = re.compile(r"exited with (-?\d+)")


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; `returncode` decides whether a retry can help."""

    def __init__(self, stage: str, returncode: int, tail: str):
        super().__init__(f"stage {stage} failed with exit code {returncode}:\n{tail}")
        self.stage = stage
        self.returncode = returncode


def should_retry(error: BaseException) -> bool:
    """Return False for invalid params and timeouts, which would fail the same way again, else True."""
    if isinstance(error, TimeoutError):
        return False
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
    # A new session gives DVC and the stage it starts one process group, so a timeout stops both.
    process = subprocess.Popen(
        command, cwd=project_dir, env=stage_environment(env), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
    )
    tail: list[str] = []
    last_progress = 0.0
    assert process.stdout is not None
    try:
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
    finally:
        # Reached with the process still running when Prefect's timeout interrupts this task.
        if process.poll() is None:
            logger.error("stopping stage %s (process group %d)", stage, process.pid)
            stop_process_group(process)
    if returncode != 0:
        raise StageFailed(stage, stage_exit_code(tail, returncode), "\n".join(tail))


def stage_environment(env: dict[str, str]) -> dict[str, str]:
    """Return the environment of `dvc repro` and its stages: this process's, `env`, and PATH.

    DVC runs each stage's `python -m stages <name>` through the shell, so this interpreter's
    folder goes first on PATH for the stage to use the same environment as the flow.
    """
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, **env, "PATH": path}


def stage_exit_code(output_tail: list[str], dvc_returncode: int) -> int:
    """Return the stage command's exit code from DVC's "exited with N" line, else DVC's own code.

    `should_retry` needs the stage's code, because DVC exits 255 for every failed stage.
    """
    for line in reversed(output_tail):
        match = DVC_EXIT_LINE.search(line)
        if match:
            return int(match.group(1))
    return dvc_returncode


def stop_process_group(process: subprocess.Popen) -> None:
    """Send SIGTERM to the process group of `process`, then SIGKILL after STOP_GRACE_S."""
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def stage_timeout(stage: str, overrides: dict[str, float] | None) -> float:
    """Return the timeout of `stage` in seconds: the override, else DEFAULT_TIMEOUTS_S, else DEFAULT_TIMEOUT_S."""
    timeout = (overrides or {}).get(stage, DEFAULT_TIMEOUTS_S.get(stage, DEFAULT_TIMEOUT_S))
    if timeout <= 0:
        raise ValueError(f"stage_timeouts[{stage!r}] = {timeout}; a timeout must be a positive number of seconds")
    return float(timeout)


@task
def changed_stages(project_dir: str) -> set[str]:
    """Return the stages that `dvc status` reports as changed (one DVC call for the whole pipeline)."""
    command = [sys.executable, "-m", "dvc", "status", "--json"]
    result = subprocess.run(command, cwd=project_dir, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"`dvc status --json` failed in {project_dir} with exit code {result.returncode}:\n"
            f"{result.stderr.strip()}\nrun it there by hand to see what DVC rejects"
        )
    # DVC names stages as "dvc.yaml:<stage>" when several dvc.yaml files exist; keep the stage name.
    return {name.split(":")[-1] for name in json.loads(result.stdout or "{}")}


def check_stage_names(project_dir: str, names: list[str], parameter: str) -> None:
    """Raise ValueError when `names` contains a stage that the dvc.yaml of `project_dir` does not define.

    Without this check the flow would skip a misspelled stage silently, because `dvc status` never
    reports an unknown stage as changed.
    """
    import yaml

    dvc_file = Path(project_dir) / "dvc.yaml"
    defined = list((yaml.safe_load(dvc_file.read_text()) or {}).get("stages", {}))
    unknown = [name for name in names if name not in defined]
    if unknown:
        raise ValueError(
            f"invalid flow parameter `{parameter}`: unknown stages {unknown}. "
            f"Use stage names that {dvc_file} defines: {defined}"
        )


def stages_to_run(selected: list[str], changed: set[str]) -> list[str]:
    """Drop the leading stages of `selected` that are up to date.

    Once one stage runs, every later selected stage runs too (through `dvc repro --single-item`,
    which still skips it when its inputs did not change), because the stage that ran may have
    changed their inputs. STAGES is in pipeline order, so a later stage never feeds an earlier one.
    """
    for position, stage in enumerate(selected):
        if stage in changed:
            return selected[position:]
    return []


@task
def publish_artifacts(project_dir: str, run_id: str) -> None:
    """Publish the evaluation report with the MLflow runs, and the pairs summary, as Prefect artifacts."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from flows.artifacts import pairs_description, pairs_summary_rows, pipeline_report_markdown
    from pgdpo.tracking import tracking_uri

    project = Path(project_dir)
    uri = tracking_uri(project_dir)
    try:
        report = pipeline_report_markdown(project, uri, run_id)
    except Exception as error:  # noqa: BLE001 - the stages succeeded; a missing report must not fail the run
        get_run_logger().warning(
            "could not read MLflow run %s from %s (%s); no pipeline-report artifact", run_id, uri, error
        )
    else:
        create_markdown_artifact(
            markdown=report, key="pipeline-report", description="Evaluation report and MLflow runs of this pipeline run"
        )
    rows = pairs_summary_rows(project)
    if rows:
        create_table_artifact(table=rows, key="pairs-summary", description=pairs_description(project))
    else:
        get_run_logger().info("no data/pairs/pairs.csv in %s; no pairs-summary artifact", project_dir)


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
def pipeline(
    project_dir: str = ".",
    stages: list[str] | None = None,
    stage_timeouts: dict[str, float] | None = None,
    use_stage_server: bool | None = None,
) -> str | None:
    """Run the DVC stages in order (all by default) under one MLflow parent run; return its id.

    One `dvc status` call first finds the leading stages that are up to date, and the flow skips
    them without starting DVC for each. When every selected stage is up to date, the flow opens
    no MLflow run and returns None.

    Args:
        project_dir: the DVC project root.
        stages: stage names to run, in order; None runs STAGES.
        stage_timeouts: seconds per stage name, replacing DEFAULT_TIMEOUTS_S for those stages.
        use_stage_server: run the stages in processes forked from a stage server that has
            imported torch, diffusers and mlflow once (`pgdpo/stage_server.py`). None (the
            default) does so when more than one stage runs: the server imports what every
            stage needs, which costs one stage alone more than it saves. False starts each
            stage as a new process.
    """
    project = str(Path(project_dir).resolve())
    params = load_params(Path(project) / "params.yaml")
    check_prompt_files(params, project)
    experiment = params.tracking.experiment
    if stages is not None and not stages:
        raise ValueError("invalid flow parameter `stages`: the list is empty. Pass None to run every stage")
    selected = list(stages or STAGES)
    check_stage_names(project, selected, "stages")
    check_stage_names(project, list(stage_timeouts or {}), "stage_timeouts")
    # Overrides of stages this run does not select are checked too.
    timeouts = {stage: stage_timeout(stage, stage_timeouts) for stage in [*selected, *(stage_timeouts or {})]}
    logger = get_run_logger()

    to_run = stages_to_run(selected, changed_stages(project))
    for stage in selected[: len(selected) - len(to_run)]:
        logger.info("skipping stage %s: dvc status reports it up to date", stage)
    if not to_run:
        logger.info("every selected stage is up to date, so the flow opens no MLflow run and publishes no artifacts")
        return None

    if use_stage_server is None:
        use_stage_server = len(to_run) > 1
    parent = open_parent_run(project, experiment)
    env = {"PGDPO_PARENT_RUN_ID": parent}
    status = "FAILED"
    try:
        with stage_server(project, stage_environment(env)) if use_stage_server else nullcontext({}) as server:
            for stage in to_run:
                run_stage.with_options(timeout_seconds=timeouts[stage])(stage, project, {**env, **server})
        status = "FINISHED"
    finally:
        close_parent_run(project, parent, status)
    publish_artifacts(project, parent)
    return parent


def main() -> None:
    """Parse the command line and run the flow."""
    import argparse

    parser = argparse.ArgumentParser(description="Run the DVC pipeline stage by stage as a Prefect flow.")
    parser.add_argument("--project-dir", default=".", help="DVC project root (default: the current folder)")
    parser.add_argument("--stages", nargs="+", default=None, metavar="STAGE", help=f"stages to run, in order (default: {' '.join(STAGES)})")
    parser.add_argument("--no-stage-server", action="store_true",
                        help="start each stage as a new process instead of forking it from a stage server")
    args = parser.parse_args()
    try:
        pipeline(project_dir=args.project_dir, stages=args.stages, use_stage_server=False if args.no_stage_server else None)
    finally:
        freeze_before_exit()


if __name__ == "__main__":
    main()
