"""Prefect flow for a grid of DVC experiments, e.g. methods x seeds or K1 x K2.

Every grid point is queued with `dvc exp run --queue -S key=value ...`; `dvc queue start` then
runs them in DVC's own temporary workspaces, which share the project's DVC cache, so unchanged
stages (prompts, base, generate, ...) are restored from the cache instead of recomputed. The
flow issues its DVC commands one at a time in the project workspace and ends with one
comparison table (`reports/sweep.md`, `reports/sweep.json`) and per-experiment probe logs.

Example:
    python -m flows.sweep --set train.method=dpo,pgdpo --set train.seed=0,1,2
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger, task

from pgdpo.io import atomic_write_text, write_json
from pgdpo.sweep import collect_experiments, comparison_markdown, plot_probe_trajectories

EXP_PREFIX = "sweep"


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
def summarise(project: str, names: list[str]) -> str:
    """Collect params, metrics and probe logs of the experiments into reports/sweep.*."""
    table = collect_experiments(project, names)
    write_json(Path(project) / "reports" / "sweep.json", table)
    plot_probe_trajectories(table, Path(project) / "reports" / "sweep_probe.png")
    markdown = comparison_markdown(table)
    atomic_write_text(Path(project) / "reports" / "sweep.md", markdown)
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown=markdown, key="sweep-comparison", description="DVC experiment grid")
    except Exception as error:  # noqa: BLE001 - the artifact is a convenience; the files are the record
        get_run_logger().warning("could not publish the Prefect artifact: %s", error)
    return markdown


@flow(name="pgdpo-sweep")
def sweep(grid: dict[str, list[str]], project_dir: str = ".", jobs: int = 1, target: str | None = None) -> str:
    """Run every combination of `grid` as a queued DVC experiment and return the comparison table.

    With `target` (e.g. "train"), each experiment runs only up to that stage; metrics of later
    stages in the table are then those of the workspace the experiments started from.
    """
    project = str(Path(project_dir).resolve())
    names = [queue_experiment(project, point, target) for point in grid_points(grid)]
    run_queue(project, jobs, names)
    return summarise(project, names)


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
    args = parser.parse_args()
    print(sweep(parse_grid(args.set), jobs=args.jobs, target=args.target))
