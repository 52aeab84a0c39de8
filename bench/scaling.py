"""Time and peak memory of each stage as the number of prompts and of pairs grows.

For each prompt count N the script copies the project into a temporary folder (as the tests'
`make_project` does, with the tests' reduced params), writes N train and N eval prompts, and runs
the stages in order. Each stage runs in a forked child of this process, which has already
imported the stage modules, so the times are stage computation without process start and
imports, and without MLflow (the stages get a disabled Tracker). Memory is the child's peak RSS
(`VmHWM`) minus its RSS at the start of the stage. After the main sweep, `label` and `train` run
again with `label.strategy: all_pairs`, which gives K(K-1)/2 pairs per prompt for K candidates.

With --smoke the base and reward models are trained once, unmeasured, and copied to the other
projects, and only the stages from generate to train are measured.

Growth is summarised as the exponent b of time ~ N^b, fitted by least squares on log-log scale;
b <= 1 means linear or better.

    python -m bench.scaling [--device cpu] [--smoke] [--out results.json]
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from tqdm.auto import tqdm

from bench.common import (
    MIB,
    ROOT,
    current_rss,
    finish,
    format_table,
    known_sections,
    parse_args,
    peak_rss,
    reset_peak_rss,
    result_header,
    run_isolated,
    setup_logging,
)
from bench.models import shapes_prompts
from pgdpo.config import load_params
from pgdpo.io import write_prompts
from pgdpo.paths import EVAL_PROMPTS, PAIRS, TRAIN_PROMPTS
from pgdpo.runtime import seed_everything
from pgdpo.testing import make_project
from pgdpo.tracking import Tracker

logger = logging.getLogger(__name__)

# The grammar of the shapes world has 60 distinct prompts, and candidate file names are built
# from the prompt, so a prompt list cannot be longer than that.
MAX_PROMPTS = 60
# A growth exponent up to this counts as linear or better; the margin absorbs timing noise.
LINEAR_EXPONENT = 1.1


class NullTracker(Tracker):
    """A disabled Tracker that also drops calls to logging methods newer than this script."""

    def __init__(self) -> None:
        super().__init__(None)

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def pipeline_stages(dvc_file: Path) -> list[str]:
    """Return the stages of `dvc_file` in file order, without `prompts`, which this script replaces."""
    stages = list(yaml.safe_load(dvc_file.read_text())["stages"])
    return [stage for stage in stages if stage != "prompts"]


def run_stage(project: Path, stage: str) -> dict:
    """Run one stage's `run(params, tracker)` in `project`; return its seconds and memory."""
    os.chdir(project)
    params = load_params("params.yaml")
    seed_everything(params.seed)
    module = importlib.import_module(f"stages.{stage}")
    start = current_rss()
    reset_peak_rss()
    started = time.perf_counter()
    module.run(params, NullTracker())
    seconds = time.perf_counter() - started
    peak = peak_rss()
    return {"seconds": seconds, "peak_rss_bytes": peak, "start_rss_bytes": start, "increase_bytes": peak - start}


def prepare_project(root: Path, num_prompts: int, overrides: dict) -> Path:
    """Copy the project with reduced params plus `overrides` and write `num_prompts` prompts."""
    project = make_project(root / f"prompts-{num_prompts}", overrides)
    prompts = shapes_prompts(num_prompts)
    write_prompts(project / TRAIN_PROMPTS, prompts)
    write_prompts(project / EVAL_PROMPTS, prompts)
    return project


def set_label_strategy(project: Path, strategy: str) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["label"]["strategy"] = strategy
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def growth_exponent(sizes: list[float], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(size)."""
    slope, _ = np.polyfit(np.log(sizes), np.log(np.maximum(values, 1e-9)), 1)
    return float(slope)


def stage_outputs(dvc_file: Path, stage: str) -> list[str]:
    """Return the `outs` paths of `stage` in `dvc_file`."""
    outs = yaml.safe_load(dvc_file.read_text())["stages"][stage].get("outs", [])
    return [out if isinstance(out, str) else next(iter(out)) for out in outs]


def run_shared(project: Path, shared: list[str], source: Path | None) -> None:
    """Give `project` the outputs of the `shared` stages: run them unmeasured, or copy them from `source`."""
    for stage in shared:
        if source is None:
            run_isolated(run_stage, project, stage)
            continue
        for output in stage_outputs(project / "dvc.yaml", stage):
            target = project / output
            target.parent.mkdir(parents=True, exist_ok=True)
            if (source / output).is_dir():
                shutil.copytree(source / output, target)
            else:
                shutil.copy2(source / output, target)


def sweep(root: Path, prompt_counts: list[int], stages: list[str], overrides: dict,
          shared: list[str]) -> tuple[list[dict], list[dict]]:
    """Run every stage at every prompt count, then label and train again with all pairs
    (when both are among `stages`).

    The `shared` stages run once, unmeasured, in the first project, and later projects get a
    copy of their outputs.
    """
    # Import the stage modules here, so that the forked children do not pay for it.
    for stage in {*stages, *shared, "label", "train"}:
        importlib.import_module(f"stages.{stage}")
    stage_rows, pair_rows = [], []
    first_project = None
    for count in tqdm(prompt_counts, desc="scaling: prompt counts", unit="size"):
        project = prepare_project(root, count, overrides)
        run_shared(project, shared, first_project)
        for stage in stages:
            logger.info("scaling: %s with %d prompts", stage, count)
            measured = run_isolated(run_stage, project, stage)
            stage_rows.append({"stage": stage, "prompts": count, **measured})
            if stage == "train":
                pairs = pd.read_csv(project / PAIRS / "pairs.csv", keep_default_na=False)
                pair_rows.append({"strategy": "best_vs_worst", "prompts": count, "pairs": len(pairs), **measured})

        if {"label", "train"} <= set(stages):
            set_label_strategy(project, "all_pairs")
            label = run_isolated(run_stage, project, "label")
            train = run_isolated(run_stage, project, "train")
            pairs = pd.read_csv(project / PAIRS / "pairs.csv", keep_default_na=False)
            pair_rows.append({"strategy": "all_pairs", "prompts": count, "pairs": len(pairs), **train,
                              "label_seconds": label["seconds"], "label_increase_bytes": label["increase_bytes"]})
        if first_project is None:
            first_project = project
        else:
            shutil.rmtree(project, ignore_errors=True)
    return stage_rows, pair_rows


def summarise(stage_rows: list[dict], pair_rows: list[dict]) -> dict:
    """Growth exponents per stage, and how train's memory changes with the number of pairs."""
    frame = pd.DataFrame(stage_rows)
    growth = {}
    for stage, block in frame.groupby("stage", sort=False):
        block = block.sort_values("prompts")
        exponent = growth_exponent(block["prompts"].tolist(), block["seconds"].tolist())
        growth[stage] = {
            "time_exponent": exponent,
            "linear_or_better": exponent <= LINEAR_EXPONENT,
            "memory_increase_first_mib": block["increase_bytes"].iloc[0] / MIB,
            "memory_increase_last_mib": block["increase_bytes"].iloc[-1] / MIB,
        }
    if not pair_rows:
        return {"growth": growth, "train_vs_pairs": None}
    pairs = pd.DataFrame(pair_rows).sort_values("pairs")
    slope_bytes_per_pair, _ = np.polyfit(pairs["pairs"], pairs["peak_rss_bytes"], 1)
    train_memory = {
        "pairs_min": int(pairs["pairs"].min()),
        "pairs_max": int(pairs["pairs"].max()),
        "peak_rss_min_mib": pairs["peak_rss_bytes"].min() / MIB,
        "peak_rss_max_mib": pairs["peak_rss_bytes"].max() / MIB,
        "peak_rss_slope_kib_per_pair": slope_bytes_per_pair / 1024,
        "time_exponent_vs_pairs": growth_exponent(pairs["pairs"].tolist(), pairs["seconds"].tolist()),
    }
    return {"growth": growth, "train_vs_pairs": train_memory}


def build_tables(stage_rows: list[dict], pair_rows: list[dict], summary: dict) -> dict[str, str]:
    frame = pd.DataFrame(stage_rows)
    counts = sorted(frame["prompts"].unique())
    time_rows, memory_rows = [], []
    for stage, block in frame.groupby("stage", sort=False):
        by_count = block.set_index("prompts")
        growth = summary["growth"][stage]
        time_rows.append([stage, *[by_count.loc[n, "seconds"] for n in counts], growth["time_exponent"],
                          "yes" if growth["linear_or_better"] else "no"])
        memory_rows.append([stage, *[by_count.loc[n, "increase_bytes"] / MIB for n in counts],
                            *[by_count.loc[n, "peak_rss_bytes"] / MIB for n in (counts[0], counts[-1])]])
    pair_table = [[row["strategy"], row["prompts"], row["pairs"], row["seconds"], row["peak_rss_bytes"] / MIB,
                   row["increase_bytes"] / MIB] for row in sorted(pair_rows, key=lambda row: row["pairs"])]
    tables = {
        "Stage time (s) by number of prompts": format_table(
            ["stage", *[f"N={n}" for n in counts], "exponent b (time ~ N^b)", "linear or better"], time_rows),
        "Stage memory: peak RSS increase during the stage (MiB) by number of prompts": format_table(
            ["stage", *[f"N={n}" for n in counts], f"peak RSS N={counts[0]}", f"peak RSS N={counts[-1]}"], memory_rows),
    }
    if pair_table:
        tables["Train stage by number of pairs"] = format_table(
            ["label strategy", "prompts", "pairs", "train s", "peak RSS MiB", "RSS increase MiB"], pair_table)
    return tables


def main() -> None:
    setup_logging()

    def options(parser) -> None:
        parser.add_argument("--prompts", type=int, nargs="+", default=None,
                            help=f"prompt counts (default 8 16 32 60; 60 is the grammar's maximum, {MAX_PROMPTS})")
        parser.add_argument("--stages", nargs="+", default=None,
                            help="stages to measure, in pipeline order (default: every stage of dvc.yaml after "
                                 "prompts; up to train with --smoke)")

    args = parse_args(__doc__.splitlines()[0], options)
    if args.device.type != "cpu":
        raise SystemExit("bench.scaling measures process RSS and runs the stages on the CPU; use --device cpu")
    all_stages = pipeline_stages(ROOT / "dvc.yaml")
    unknown = sorted(set(args.stages or []) - set(all_stages))
    if unknown:
        raise SystemExit(f"--stages {unknown} not in dvc.yaml; choose from {all_stages}")
    if args.smoke:
        counts = args.prompts or [4, 8]
        # The base model and the reward model do not depend on how many prompts later stages
        # use, so the smoke run trains them once and measures the stages from generate to train.
        shared = [stage for stage in ("base", "reward_model") if stage in all_stages]
        stages = args.stages or [s for s in all_stages[: all_stages.index("train") + 1] if s not in shared]
        overrides = {"base": {"vae_steps": 1, "transformer_steps": 1, "clips_per_prompt": 1},
                     "reward_model": {"steps": 2, "clips_per_prompt": 1, "eval_clips_per_prompt": 1},
                     "generate": {"num_inference_steps": 1, "num_candidates": 3},
                     "label": {"min_margin": 0.0, "num_probe_pairs": 1},
                     "train": {"steps": 1, "probe_every": 1, "batch_size": 2, "log_every": 1}}
    else:
        counts = args.prompts or [8, 16, 32, 60]
        stages = args.stages or all_stages
        shared = []
        overrides = {"generate": {"num_inference_steps": 3, "num_candidates": 4}}
    too_many = [n for n in counts if not 1 <= n <= MAX_PROMPTS]
    if too_many:
        raise SystemExit(f"--prompts {too_many} out of range: the shapes world has {MAX_PROMPTS} distinct prompts")

    overrides = known_sections(overrides)
    result = result_header("scaling", args)
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as folder:
        stage_rows, pair_rows = sweep(Path(folder), counts, stages, overrides, shared)
    summary = summarise(stage_rows, pair_rows)
    result.update({"prompt_counts": counts, "stages": stages, "shared_unmeasured_stages": shared,
                   "param_overrides": overrides,
                   "stage_runs": stage_rows, "pair_runs": pair_rows, **summary})
    finish(result, build_tables(stage_rows, pair_rows, summary), args.out)


if __name__ == "__main__":
    main()
