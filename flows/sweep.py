"""Prefect flow for a grid of DVC experiments, e.g. methods x seeds or K1 x K2.

Every grid point is queued with `dvc exp run --queue -S key=value ...`; `dvc queue start` then
runs them in DVC's own temporary workspaces, which share the project's DVC cache, so unchanged
stages (prompts, base, generate, ...) are restored from the cache instead of recomputed. The
flow issues its DVC commands one at a time in the project workspace and ends with one
comparison table (`reports/sweep.md`, `reports/sweep.json`) and per-experiment probe logs.

The table is also published as the Prefect artifacts `sweep-comparison` (markdown) and
`sweep-table` (table), and logged to an MLflow run named `sweep` (table, reports, plot). The
best experiment by `metric` gets the registry alias `alias` on the model version that its
`train` stage registered under `tracking.registered_model`. Stage runs carry the DVC experiment
name in the tag `pgdpo.dvc_exp`, which links model versions to experiments.

Example:
    python -m flows.sweep --set train.method=dpo,pgdpo --set train.seed=0,1,2
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger, task

from pgdpo.config import load_params
from pgdpo.io import atomic_write_text, write_json
from pgdpo.sweep import COLUMNS, collect_experiments, comparison_markdown, plot_probe_trajectories
from pgdpo.tracking import DVC_EXP_TAG, create_store, tracking_uri

logger = logging.getLogger(__name__)

EXP_PREFIX = "sweep"
METRICS = tuple(label for label, _, _ in COLUMNS)


def dvc(args: list[str], project: str, timeout: float | None = None) -> str:
    """Run one DVC command in `project` and return its stdout; raise with its output on failure."""
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Expand {key: [values]} into the list of all combinations, in a stable order."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[key] for key in keys))]


def experiment_name(point: dict[str, str]) -> str:
    """Name an experiment after its overrides, e.g. sweep-method-dpo-seed-1."""
    parts = [f"{key.split('.')[-1]}-{value}" for key, value in point.items()]
    return "-".join([EXP_PREFIX, *parts]).replace("_", "-").replace(".", "p")


@task
def queue_experiment(project: str, point: dict[str, str], target: str | None = None) -> str:
    """Queue one grid point as a DVC experiment (up to stage `target`, default all) and return its name."""
    name = experiment_name(point)
    overrides = [arg for key, value in point.items() for arg in ("-S", f"{key}={value}")]
    dvc(["exp", "run", "--queue", "--name", name, *overrides, *([target] if target else [])], project)
    get_run_logger().info("queued %s with %s", name, point)
    return name


@task(timeout_seconds=6 * 3600)
def run_queue(project: str, jobs: int, names: list[str]) -> None:
    """Start DVC's queue workers and wait until every queued experiment has ended."""
    logger = get_run_logger()
    dvc(["queue", "start", "-j", str(jobs)], project)
    while True:
        status = dvc(["queue", "status"], project)
        active = [line for line in status.splitlines() if any(word in line for word in ("Running", "Queued"))]
        if not active:
            break
        logger.info("%d experiment(s) queued or running", len(active))
        time.sleep(20)
    failed = [line for line in status.splitlines() if "Failed" in line]
    if failed:
        raise RuntimeError("some experiments failed:\n" + "\n".join(failed) + "\nsee `dvc queue logs <name>`")
    dvc(["queue", "stop"], project)


@task
def summarise(project: str, names: list[str]) -> list[dict]:
    """Collect params, metrics and probe logs of the experiments into reports/sweep.*; return the records."""
    table = collect_experiments(project, names)
    write_json(Path(project) / "reports" / "sweep.json", table)
    plot_probe_trajectories(table, Path(project) / "reports" / "sweep_probe.png")
    markdown = comparison_markdown(table)
    atomic_write_text(Path(project) / "reports" / "sweep.md", markdown)
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        create_markdown_artifact(markdown=markdown, key="sweep-comparison", description="DVC experiment grid")
        create_table_artifact(
            table=comparison_rows(table), key="sweep-table", description="DVC experiment grid, one row per experiment"
        )
    except Exception as error:  # noqa: BLE001 - the artifact is a convenience; the files are the record
        get_run_logger().warning("could not publish the Prefect artifacts: %s", error)
    return table


def comparison_rows(records: list[dict]) -> list[dict]:
    """Flatten sweep records to one row per experiment: name, method, seed and every metric column."""
    return [{"experiment": r["name"], "method": r["method"], "seed": r["seed"], **r["metrics"]} for r in records]


def best_experiment(records: list[dict], metric: str, higher_is_better: bool = True) -> str:
    """Return the name of the experiment with the best value of `metric` (a comparison-table column)."""
    if metric not in METRICS:
        raise ValueError(f"unknown sweep metric {metric!r}; expected one of {list(METRICS)}")
    if not records:
        raise ValueError("no experiments to choose the best from")
    pick = max if higher_is_better else min
    return pick(records, key=lambda record: record["metrics"][metric])["name"]


def set_best_alias(client, model_name: str, experiment: str, alias: str) -> str | None:
    """Point `alias` of registered model `model_name` at the newest version from DVC experiment `experiment`.

    Returns the version, or None (with a warning) when no version came from that experiment.
    """
    versions = client.search_model_versions(f"name = '{model_name}'")
    matching = [
        version for version in versions
        if version.run_id and client.get_run(version.run_id).data.tags.get(DVC_EXP_TAG) == experiment
    ]
    if not matching:
        logger.warning(
            "no version of registered model %s comes from experiment %s (tag %s); alias %s not set",
            model_name, experiment, DVC_EXP_TAG, alias,
        )
        return None
    version = str(max(matching, key=lambda v: int(v.version)).version)
    client.set_registered_model_alias(model_name, alias, version)
    logger.info("registered model %s: alias %s -> version %s (experiment %s)", model_name, alias, version, experiment)
    return version


@task(retries=2, retry_delay_seconds=5)
def log_to_mlflow(project: str, records: list[dict], metric: str, higher_is_better: bool, alias: str | None) -> str:
    """Log the comparison to an MLflow run named `sweep`, set the best-model alias; return the run id."""
    import mlflow
    import pandas as pd

    params = load_params(Path(project) / "params.yaml")
    uri = tracking_uri(project)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(params.tracking.experiment)
    best = best_experiment(records, metric, higher_is_better)
    with mlflow.start_run(run_name="sweep", tags={"pgdpo.sweep.best": best, "pgdpo.sweep.metric": metric}) as run:
        mlflow.log_table(pd.DataFrame(comparison_rows(records)), artifact_file="sweep_comparison.json")
        for name in ("sweep.md", "sweep.json", "sweep_probe.png"):
            path = Path(project) / "reports" / name
            if path.is_file():
                mlflow.log_artifact(str(path), artifact_path="reports")
        best_value = next(r["metrics"][metric] for r in records if r["name"] == best)
        mlflow.log_metric("best_value", best_value)
    if alias and params.tracking.registered_model:
        set_best_alias(mlflow.MlflowClient(uri), params.tracking.registered_model, best, alias)
    return run.info.run_id


@flow(name="pgdpo-sweep")
def sweep(
    grid: dict[str, list[str]],
    project_dir: str = ".",
    jobs: int = 1,
    target: str | None = None,
    metric: str = "eval reward",
    higher_is_better: bool = True,
    alias: str | None = "best",
) -> str:
    """Run every combination of `grid` as a queued DVC experiment and return the comparison table.

    With `target` (e.g. "train"), each experiment runs only up to that stage; metrics of later
    stages in the table are then those of the workspace the experiments started from.

    Args:
        metric: comparison-table column that picks the best experiment (see pgdpo.sweep.COLUMNS).
        alias: registry alias set on the best experiment's model version; None sets none.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown sweep metric {metric!r}; expected one of {list(METRICS)}")
    project = str(Path(project_dir).resolve())
    names = [queue_experiment(project, point, target) for point in grid_points(grid)]
    # The experiments log into the project's store (see tracking_uri), with up to `jobs` at once.
    create_store(tracking_uri(project))
    run_queue(project, jobs, names)
    records = summarise(project, names)
    log_to_mlflow(project, records, metric, higher_is_better, alias)
    return comparison_markdown(records)


def parse_grid(values: list[str]) -> dict[str, list[str]]:
    """Parse ["train.method=dpo,pgdpo", ...] into {"train.method": ["dpo", "pgdpo"], ...}."""
    grid = {}
    for item in values:
        key, sep, options = item.partition("=")
        if not sep or not options:
            raise SystemExit(f"--set expects key=value1,value2; got {item!r}")
        grid[key] = options.split(",")
    return grid


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", required=True, help="params key and comma-separated values")
    parser.add_argument("--jobs", type=int, default=1, help="experiments run at once")
    parser.add_argument("--target", default=None, help="last stage to run, e.g. train (default: all)")
    parser.add_argument("--metric", default="eval reward", choices=METRICS, help="comparison column that picks the best run")
    parser.add_argument("--lower-is-better", action="store_true", help="pick the smallest value of --metric")
    parser.add_argument("--alias", default="best", help="registry alias for the best run's model version ('' for none)")
    args = parser.parse_args()
    grid = parse_grid(args.set)
    table = sweep(
        grid, jobs=args.jobs, target=args.target, metric=args.metric,
        higher_is_better=not args.lower_is_better, alias=args.alias or None,
    )
    print(table)
