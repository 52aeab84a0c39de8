"""Orchestration overhead of the whole pipeline: `dvc repro` wall time minus the stages' own time.

The project is copied into a temporary folder as a fresh git repository (the tests' `make_project`),
with the default params unless --small is given. The script runs `dvc repro` (or the Prefect flow
with --runner prefect) once from scratch, then once more, when every stage is up to date (the
no-op run). Each stage tags its MLflow run with the times at which its computation started and
ended (`pgdpo.stage`), and the stages' own time is read from those tags. The rest is overhead:
DVC's hashing and locking, Prefect, process start, imports, params validation, and waiting for
the MLflow tracking worker (`pgdpo.tracking_worker`) at the end of a stage.
With `--stage-server on`, the stages and their tracking workers run in processes forked from a
stage server (`pgdpo/stage_server.py`) that has imported torch, diffusers and mlflow once: the
dvc runner runs `python -m pgdpo.stage_server dvc repro`, and the prefect runner uses the flow's
default (a server when more than one stage runs). The default is `off` for dvc and `on` for
prefect, each runner as a user starts it.
NOTE: the tracking worker opens the run and logs while the stage computes, on another core. On a
machine with one core, that work slows the stage instead and counts as stage time here.

    python -m bench.pipeline_overhead [--small] [--runner dvc|prefect] [--stage-server on|off] [--out results.json]
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import ROOT, finish, format_table, known_sections, parse_args, result_header, setup_logging
from pgdpo.stage import COMPUTE_END_TAG, COMPUTE_START_TAG
from pgdpo.testing import SMALL_PARAMS, make_project, project_env
from pgdpo.tracking import STAGE_TAG

logger = logging.getLogger(__name__)

OVERHEAD_TARGET = 0.10
NOOP_TARGET_S = 15.0

# --smoke: the tests' reduced params cut further, so that each stage computes for a few seconds.
SMOKE_PARAMS = {
    "base": {"vae_steps": 1, "transformer_steps": 1, "clips_per_prompt": 1},
    "reward_model": {"steps": 2, "clips_per_prompt": 1, "eval_clips_per_prompt": 1},
    "generate": {"num_inference_steps": 1, "num_candidates": 2},
    "train": {"steps": 1, "probe_every": 1, "batch_size": 2, "log_every": 1},
    "evaluate": {"num_inference_steps": 1, "num_videos_per_prompt": 1, "sheet_prompts": 1},
}


def param_overrides(mode: str) -> dict:
    """Sections that `make_project` applies: the defaults back, the tests' params, or smaller ones."""
    if mode == "small":
        return {}
    if mode == "smoke":
        return known_sections(SMOKE_PARAMS)
    defaults = yaml.safe_load((ROOT / "params.yaml").read_text())
    return {section: defaults[section] for section in SMALL_PARAMS if section in defaults}


def pipeline_command(runner: str, stage_server: bool) -> list[str]:
    if runner == "prefect":
        return [sys.executable, "-m", "flows.pipeline", *([] if stage_server else ["--no-stage-server"])]
    command = [sys.executable, "-m", "dvc", "repro"]
    return [sys.executable, "-m", "pgdpo.stage_server", *command] if stage_server else command


def run_pipeline(project: Path, command: list[str], log_file: Path) -> float:
    """Run the whole pipeline in `project` and return its wall time in seconds."""
    logger.info("running %s in %s (output in %s)", " ".join(command), project, log_file)
    started = time.perf_counter()
    with open(log_file, "w") as log:
        completed = subprocess.run(command, cwd=project, env=project_env(project), stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        tail = log_file.read_text()[-4000:]
        raise RuntimeError(f"{' '.join(command)} exited with {completed.returncode} in {project}:\n{tail}")
    return seconds


def stage_runs(project: Path) -> list[dict]:
    """Return the MLflow stage runs of `project` (name, computation start and end in seconds), in start order."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`{STAGE_TAG}` != ''", max_results=1000)
    rows = [
        {"stage": run.data.tags[STAGE_TAG], "start": float(run.data.tags[COMPUTE_START_TAG]),
         "end": float(run.data.tags[COMPUTE_END_TAG])}
        for run in runs
        if COMPUTE_END_TAG in run.data.tags
    ]
    return sorted(rows, key=lambda row: row["start"])


# Starts the MLflow tracking worker the way every stage does and closes it at once: the longest
# a stage can wait for its worker (one that computes for longer waits less, or not at all).
WORKER_PROBE = (
    "from pgdpo.tracking_worker import WorkerTracker\n"
    "WorkerTracker('bench-overhead-probe', 'bench-overhead-probe', {'section': {'key': 1}}, required=True).close('FINISHED')\n"
)


# Prints how long `import stages.<name>` takes inside the process, without the process's exit.
IMPORT_PROBE = "import time\nstarted = time.perf_counter()\nimport stages.{stage}\nprint(time.perf_counter() - started)\n"

WAIT_SOURCES = {"logged": "as each stage logged it", "estimate": "estimate: round trip minus stage time"}

# The line `WorkerTracker.close` logs in each stage process when its tracking worker is done.
WORKER_DONE = re.compile(r"MLflow tracking worker of stage (\S+) done ([0-9.]+) s after the stage")
# The stage server's lines: its imports, each process it forks, each command it rejects.
SERVER_READY = re.compile(r"stage server: \d+ modules imported in ([0-9.]+) s")
SERVER_FORK = re.compile(r"stage server: process \d+ runs `python -m ([^\s`]+)")
COMMAND_RUN_ALONE = "did not run `python -m"


def server_summary(log_file: Path) -> dict:
    """Count what the stage server did in a run, from its lines in `log_file`."""
    text = log_file.read_text()
    ready = [float(seconds) for seconds in SERVER_READY.findall(text)]
    forks = SERVER_FORK.findall(text)
    return {
        "imports_s": ready,
        "forked_stages": sum(module == "stages" for module in forks),
        "forked_tracking_workers": sum(module == "pgdpo.tracking_worker" for module in forks),
        "commands_run_alone": text.count(COMMAND_RUN_ALONE) + text.count("is unreachable"),
    }


def time_command(command: list[str], project: Path) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=project, env=project_env(project), check=True, capture_output=True)
    return time.perf_counter() - started


def import_seconds(project: Path, stage: str) -> float:
    command = [sys.executable, "-c", IMPORT_PROBE.format(stage=stage)]
    result = subprocess.run(command, cwd=project, env=project_env(project), check=True, capture_output=True, text=True)
    return float(result.stdout.split()[-1])


def logged_worker_waits(log_file: Path) -> dict[str, float]:
    """Return each stage's wait for its tracking worker, as the stage logged it in `log_file`."""
    return {match[1]: float(match[2]) for match in WORKER_DONE.finditer(log_file.read_text())}


def overhead_breakdown(project: Path, stages: list[str]) -> dict:
    """Time the parts of a stage process that are not stage work, each in a fresh process.

    `interpreter_s` is the wall time of `python -c pass`. `imports_s` maps each stage to that
    time plus `import stages.<name>` timed inside the process. `worker_round_trip_s` is the time
    to start a tracking worker and close it with no stage work, minus the interpreter.
    """
    python = sys.executable
    interpreter = time_command([python, "-c", "pass"], project)
    imports = {stage: interpreter + import_seconds(project, stage) for stage in stages}
    worker = time_command([python, "-c", WORKER_PROBE], project) - interpreter
    return {"interpreter_s": interpreter, "imports_s": imports, "worker_round_trip_s": worker}


def measure(mode: str, runner: str, stage_server: bool, root: Path, breakdown: bool) -> dict:
    project = make_project(root / "project", param_overrides(mode))
    command = pipeline_command(runner, stage_server)
    started_at = time.time()
    total = run_pipeline(project, command, root / "repro.log")
    runs = stage_runs(project)
    if not runs:
        raise RuntimeError(f"no MLflow stage runs found in {project / 'mlflow.db'}; did the stages log to it?")
    noop = run_pipeline(project, command, root / "noop.log")
    noop_runs = len(stage_runs(project)) - len(runs)

    stage_seconds = sum(run["end"] - run["start"] for run in runs)
    previous_end = started_at
    stages = []
    for run in runs:
        stages.append({"stage": run["stage"], "seconds": run["end"] - run["start"], "gap_before_s": run["start"] - previous_end})
        previous_end = run["end"]
    overhead = total - stage_seconds
    parts = {}
    # With a stage server, the stages import nothing in their own processes. So the breakdown by
    # imports timed in fresh processes does not apply, and the server's own counts replace it.
    if breakdown and not stage_server:
        parts = overhead_breakdown(project, [run["stage"] for run in runs])
        imports = sum(parts["imports_s"].values())
        # A stage waits for its worker only for the part of the round trip its computation did not cover.
        estimate = sum(max(0.0, parts["worker_round_trip_s"] - stage["seconds"]) for stage in stages)
        logged = logged_worker_waits(root / "repro.log")
        measured = set(logged) == {stage["stage"] for stage in stages}
        worker_wait = sum(logged.values()) if measured else estimate
        parts.update({"imports_total_s": imports, "worker_waits_logged_s": logged, "worker_wait_estimate_s": estimate,
                      "worker_wait_s": worker_wait, "worker_wait_source": "logged" if measured else "estimate",
                      "dvc_and_other_s": overhead - imports - worker_wait})
    return {
        "params": mode,
        "runner": runner,
        "stage_server": stage_server,
        "command": " ".join(["python", *command[1:]]),
        "server": server_summary(root / "repro.log") if stage_server else {},
        "total_s": total,
        "stage_sum_s": stage_seconds,
        "overhead_s": overhead,
        "overhead_fraction": overhead / total,
        "overhead_target": OVERHEAD_TARGET,
        "overhead_met": overhead / total < OVERHEAD_TARGET,
        "tail_after_last_stage_s": started_at + total - previous_end,
        "stages": stages,
        "noop_s": noop,
        "noop_stage_runs": noop_runs,
        "noop_target_s": NOOP_TARGET_S,
        "noop_met": noop < NOOP_TARGET_S,
        "breakdown": parts,
    }


def run_measure(mode: str, runner: str, stage_server: bool, keep: Path | None, breakdown: bool) -> dict:
    """Run `measure` in `keep` (kept afterwards) or in a temporary folder."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=False)
        return measure(mode, runner, stage_server, keep, breakdown)
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as folder:
        return measure(mode, runner, stage_server, Path(folder), breakdown)


def main() -> None:
    setup_logging()

    def options(parser) -> None:
        parser.add_argument("--small", action="store_true", help="use the tests' reduced params (pgdpo/testing.py)")
        parser.add_argument("--runner", choices=["dvc", "prefect"], default="dvc",
                            help="dvc: `dvc repro`; prefect: `python -m flows.pipeline` (dvc repro per stage)")
        parser.add_argument("--stage-server", choices=["on", "off", "both"], default=None,
                            help="fork the stages from a stage server (default: off for dvc, on for prefect); "
                                 "both: one pipeline run without, then one with")
        parser.add_argument("--keep", type=Path, default=None, help="run in this folder and keep it (default: a temp folder)")

    args = parse_args(__doc__.splitlines()[0], options)
    if args.device.type != "cpu":
        raise SystemExit("bench.pipeline_overhead runs the stages with params.yaml's runtime.device; use --device cpu")
    mode = "default"
    if args.small:
        mode = "small"
    if args.smoke:
        mode = "smoke"
    choice = args.stage_server or ("on" if args.runner == "prefect" else "off")
    servers = {"off": [False], "on": [True], "both": [False, True]}[choice]

    result = result_header("pipeline_overhead", args)
    entries = []
    for stage_server in servers:
        keep = None
        if args.keep is not None:
            keep = args.keep / ("stage-server" if stage_server else "new-processes")
        entries.append(run_measure(mode, args.runner, stage_server, keep, breakdown=not args.smoke))
    # The last run's numbers are the result's own fields. With `both`, the first run goes under
    # `without_stage_server`, beside the ratio of the two overheads.
    result.update(entries[-1])
    if len(entries) == 2:
        before, after = entries
        result["without_stage_server"] = before
        result["overhead_ratio_without_to_with"] = before["overhead_s"] / after["overhead_s"]
        result["total_ratio_without_to_with"] = before["total_s"] / after["total_s"]

    summary_rows = [
        [mode, args.runner, "on" if entry["stage_server"] else "off", entry["total_s"], entry["stage_sum_s"],
         entry["overhead_s"], 100 * entry["overhead_fraction"], "yes" if entry["overhead_met"] else "no",
         entry["noop_s"], "yes" if entry["noop_met"] else "no"]
        for entry in entries
    ]
    stage_rows = [
        [row["stage"], *(value for entry in entries for value in stage_times(entry, row["stage"]))]
        for row in entries[-1]["stages"]
    ]
    stage_headers = [header for entry in entries for header in (
        f"{'with' if entry['stage_server'] else 'without'} server: seconds", "gap before s")]
    tables = {
        "Pipeline overhead": format_table(
            ["params", "runner", "stage server", "total s", "stages s", "overhead s", "overhead %", "< 10%", "no-op s", "no-op < 15 s"],
            summary_rows),
        "Stages (computation times tagged on the MLflow runs; gap = time since the previous stage ended)": format_table(
            ["stage", *stage_headers], stage_rows),
    }
    if len(entries) == 2:
        tables["Stage server"] = format_table(
            ["overhead without / with", "total without / with"],
            [[result["overhead_ratio_without_to_with"], result["total_ratio_without_to_with"]]])
    server = entries[-1]["server"]
    if server:
        tables["Stage server (from its lines in the log)"] = format_table(
            ["imports s", "forked stages", "forked tracking workers", "commands run in their own process"],
            [[", ".join(f"{seconds:.1f}" for seconds in server["imports_s"]), server["forked_stages"],
              server["forked_tracking_workers"], server["commands_run_alone"]]])
    parts = entries[0]["breakdown"]
    if parts:
        tables["Overhead breakdown without the server (imports and the round trip timed in fresh processes)"] = format_table(
            ["part", "seconds"],
            [["interpreter start (one process)", parts["interpreter_s"]],
             ["stage imports, all stages (incl. interpreter start)", parts["imports_total_s"]],
             ["MLflow tracking worker round trip with no stage work (one stage)", parts["worker_round_trip_s"]],
             [f"waiting for the tracking workers, all stages ({WAIT_SOURCES[parts['worker_wait_source']]})",
              parts["worker_wait_s"]],
             ["DVC, process exits and the rest (overhead minus the above)", parts["dvc_and_other_s"]]])
    finish(result, tables, args.out)


def stage_times(entry: dict, stage: str) -> tuple[float, float]:
    row = next(row for row in entry["stages"] if row["stage"] == stage)
    return row["seconds"], row["gap_before_s"]


if __name__ == "__main__":
    main()
