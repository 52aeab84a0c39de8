"""Benchmark one PG-DPO training step: pgdpo's path against the public Diffusion-DPO training loop.

For each benchmark model the two paths (see `bench.paths`) run interleaved in one process on the
same batches, noise and noise levels, so the speed ratio comes from one run and the losses can be
compared step by step. On CPU, peak memory of each path is measured in a forked child process. The
script also times every per-step diagnostic and the held-out likelihood probe, and reports their
share of the training time at the intervals params.yaml sets.

    python -m bench.train_step [--device cpu|cuda] [--smoke] [--out results.json]
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import pgdpo.losses.dispatch as loss_dispatch
from bench.common import (
    MIB,
    ROOT,
    PeakMemory,
    Stopwatch,
    add_models_option,
    current_rss,
    finish,
    format_table,
    parse_args,
    result_header,
    run_isolated,
    setup_logging,
    summarise_times,
    use_fresh_inductor_cache,
)
from bench.models import MODELS, render_pairs
from bench.paths import PATHS, BaselinePath, PgdpoPath, encode_pairs, step_inputs
from pgdpo.config import Params, load_params
from pgdpo.training.checkpoint import save_checkpoint
from pgdpo.training.trainer import LikelihoodProbe, pair_errors

logger = logging.getLogger(__name__)

# Both paths must give the same loss on the same batch. They compute the same function in float32,
# so only rounding can move the loss: a different LoRA forward and attention processor, and how
# the VAE batches its input. The loss multiplies differences of per-sample errors by beta (2500 by
# default), so rounding the errors (a few float32 steps each, about 1e-7 of errors near 1) can move
# it by a few times beta * 1e-7. The absolute bound allows that much. A different noise draw,
# timestep or reference moves the errors by far more and the loss by order one.
LOSS_ATOL_PER_BETA = 4 * float(np.finfo(np.float32).eps)
LOSS_RTOL = 1e-4


@dataclass
class Sizes:
    """How much work one run does."""

    batch_size: int
    num_pairs: int
    warmup: int
    reps: int
    memory_steps: int
    probe_pairs: int
    diagnostic_reps: int
    # Creating an MLflow sqlite store takes several seconds, so smoke runs skip the logging timings.
    time_mlflow: bool = True


def sizes_for(args, params: Params) -> Sizes:
    if args.smoke:
        return Sizes(batch_size=2, num_pairs=4, warmup=1, reps=2, memory_steps=1, probe_pairs=2, diagnostic_reps=2,
                     time_mlflow=False)
    return Sizes(
        batch_size=params.train.batch_size,
        num_pairs=32,
        warmup=2,
        reps=args.reps,
        memory_steps=3,
        probe_pairs=params.label.num_probe_pairs,
        diagnostic_reps=10,
    )


# ----- peak memory ----------------------------------------------------------------------------


def measure_memory(model: str, path_name: str, device: torch.device, sizes: Sizes) -> dict:
    """Build one path and run `sizes.memory_steps` steps; return its peak memory in bytes.

    `path_peak_bytes` is the peak minus the memory in use before the path was built, so it
    counts the path's models, data, activations and optimizer state.
    """
    params = load_params(ROOT / "params.yaml")
    clips = render_pairs(sizes.num_pairs, MODELS[model].spec, seed=0)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else current_rss()
    path = PATHS[path_name](model, device, params, clips, sizes.batch_size)
    with PeakMemory(device) as memory:
        for rep in range(sizes.memory_steps):
            path.step(*step_inputs(path.adapter, clips, sizes.batch_size, seed=rep))
    return {
        "peak_bytes": memory.peak,
        "increase_during_steps_bytes": memory.increase,
        "path_peak_bytes": memory.peak - before,
        "model_bytes": path.weight_bytes(),
        "kind": "allocated CUDA memory" if device.type == "cuda" else "process RSS",
    }


def measure_all_memory(models: list[str], device: torch.device, sizes: Sizes) -> dict:
    """Measure every (model, path); on CPU each one in its own forked child."""
    results: dict = {}
    for model in models:
        results[model] = {}
        for path_name in PATHS:
            logger.info("peak memory: %s %s", model, path_name)
            if device.type == "cuda":
                results[model][path_name] = measure_memory(model, path_name, device, sizes)
                torch.cuda.empty_cache()
            else:
                results[model][path_name] = run_isolated(measure_memory, model, path_name, device, sizes)
    return results


# ----- step time and loss equality ------------------------------------------------------------


@contextlib.contextmanager
def timed_loss_metrics(device: torch.device, sink: list[float]):
    """Time every call of the loss diagnostics (`pgdpo.losses.dispatch._metrics`) into `sink`."""
    original = loss_dispatch._metrics

    def wrapper(*args, **kwargs):
        with Stopwatch(device) as watch:
            values = original(*args, **kwargs)
        sink.append(watch.seconds)
        return values

    loss_dispatch._metrics = wrapper
    try:
        yield
    finally:
        loss_dispatch._metrics = original


def compare_steps(
    model: str, device: torch.device, params: Params, sizes: Sizes, compiled: bool = False
) -> tuple[dict, PgdpoPath]:
    """Run the paths interleaved on identical inputs; return times, losses and the pgdpo path.

    A third path runs pgdpo's step on the model as diffusers and peft ship it
    (`pgdpo_stock_kernels`), which tells what pgdpo's kernels add to caching and the shared
    reference. With `compiled`, another path runs pgdpo's step with the denoiser under
    `torch.compile` (`train.compile`); its warm-up steps hold the compilation and are reported
    separately.
    """
    clips = render_pairs(sizes.num_pairs, MODELS[model].spec, seed=0)
    paths = {"baseline": BaselinePath(model, device, params, clips, sizes.batch_size),
             "pgdpo": PgdpoPath(model, device, params, clips, sizes.batch_size),
             "pgdpo_stock_kernels": PgdpoPath(model, device, params, clips, sizes.batch_size, stock_kernels=True)}
    if compiled:
        paths["pgdpo_compiled"] = PgdpoPath(model, device, params, clips, sizes.batch_size, compiled=True)
    warmup_times: dict[str, list[float]] = {name: [] for name in paths}
    times: dict[str, list[float]] = {name: [] for name in paths}
    phases: dict[str, list[dict]] = {name: [] for name in paths}
    losses: dict[str, list[float]] = {name: [] for name in paths}
    diffs: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    metric_times: list[float] = []

    total = sizes.warmup + sizes.reps
    for rep in tqdm(range(total), desc=f"train step {model}", unit="rep"):
        # Alternate the order so that neither path always runs right after the other.
        order = list(paths) if rep % 2 == 0 else list(reversed(paths))
        rows, noise, sigmas = step_inputs(paths["pgdpo"].adapter, clips, sizes.batch_size, seed=1000 + rep)
        for name in order:
            sink = metric_times if (name == "pgdpo" and rep >= sizes.warmup) else []
            with timed_loss_metrics(device, sink), Stopwatch(device) as watch:
                result = paths[name].step(rows, noise, sigmas)
            losses[name].append(result.loss)
            diffs[name].append((result.metrics["diff_chosen"], result.metrics["diff_rejected"]))
            if rep >= sizes.warmup:
                times[name].append(watch.seconds)
                phases[name].append(result.phases)
            else:
                warmup_times[name].append(watch.seconds)
        # The paths round differently (peft's LoRA forward against pgdpo's), so their weights would
        # drift apart step by step. Starting each step from the baseline's weights makes each
        # check compare the losses of the same weights on the same batch.
        for name in paths:
            paths[name].copy_lora_from(paths["baseline"])

    loss_w, loss_p = np.array(losses["baseline"]), np.array(losses["pgdpo"])
    loss_atol = LOSS_ATOL_PER_BETA * params.train.loss_config().beta
    abs_diff = np.abs(loss_w - loss_p)
    diff_gap = np.abs(np.array(diffs["baseline"]) - np.array(diffs["pgdpo"]))
    per_rep_ratio = [b / p for b, p in zip(times["baseline"], times["pgdpo"])]
    result = {
        "steps_compared": total,
        "times": {name: summarise_times(values) for name, values in times.items()},
        "phases_median_s": {
            name: {key: statistics.median(row[key] for row in rows) for key in rows[0]} for name, rows in phases.items()
        },
        "speedup_ratio_of_medians": statistics.median(times["baseline"]) / statistics.median(times["pgdpo"]),
        "speedup_median_of_rep_ratios": statistics.median(per_rep_ratio),
        "kernels": {
            "baseline_over_stock_kernels": statistics.median(times["baseline"])
            / statistics.median(times["pgdpo_stock_kernels"]),
            "stock_kernels_over_pgdpo": statistics.median(times["pgdpo_stock_kernels"])
            / statistics.median(times["pgdpo"]),
            "loss_max_abs_diff_vs_baseline": float(
                np.abs(np.array(losses["pgdpo_stock_kernels"]) - loss_w).max()
            ),
        },
        "losses": {name: values for name, values in losses.items()},
        "loss_max_abs_diff": float(abs_diff.max()),
        "loss_max_rel_diff": float((abs_diff / np.maximum(np.abs(loss_p), 1e-12)).max()),
        "diff_chosen_rejected_max_abs_diff": float(diff_gap.max()),
        "loss_tolerance": {"atol": loss_atol, "rtol": LOSS_RTOL},
        "losses_match": bool(np.all(abs_diff <= loss_atol + LOSS_RTOL * np.abs(loss_p))),
        "loss_metrics_s": summarise_times(metric_times),
    }
    if compiled:
        result["compiled"] = compiled_summary(times, warmup_times, losses)
    return result, paths["pgdpo"]


def compiled_summary(times: dict[str, list[float]], warmup_times: dict[str, list[float]],
                     losses: dict[str, list[float]]) -> dict:
    """Speed of the compiled pgdpo step against both eager paths, its compile cost and its loss gap."""
    baseline, eager, compiled = (statistics.median(times[name]) for name in ("baseline", "pgdpo", "pgdpo_compiled"))
    # Compilation happens in the warm-up steps; what they took beyond eager warm-up steps is its cost.
    compile_s = sum(warmup_times["pgdpo_compiled"]) - sum(warmup_times["pgdpo"])
    gap = np.abs(np.array(losses["pgdpo_compiled"]) - np.array(losses["baseline"]))
    return {
        "speedup_over_baseline": baseline / compiled,
        "speedup_over_eager_pgdpo": eager / compiled,
        "compile_s": compile_s,
        "break_even_steps_vs_eager_pgdpo": compile_s / (eager - compiled) if eager > compiled else math.inf,
        "loss_max_abs_diff": float(gap.max()),
        "loss_max_rel_diff": float((gap / np.maximum(np.abs(np.array(losses["baseline"])), 1e-12)).max()),
    }


# ----- diagnostics and probe ------------------------------------------------------------------


def time_diagnostics(pgdpo: PgdpoPath, device: torch.device, params: Params, sizes: Sizes, step_s: float,
                     metric_s: float, phases: dict[str, float]) -> dict:
    """Time the probe, MLflow logging and checkpointing; return each one's share of training time."""
    cfg = params.train
    clips = render_pairs(sizes.probe_pairs, pgdpo.adapter.spec, seed=77)
    probe = LikelihoodProbe(pgdpo.adapter, encode_pairs(pgdpo.adapter, clips), pgdpo.cfg)
    denoiser = pgdpo.adapter.denoiser

    # Interleave the probe as the trainer runs it with the same probe under inference_mode, which
    # records no autograd graph.
    probe_times, inference_times = [], []
    for _ in range(sizes.diagnostic_reps):
        with Stopwatch(device) as watch:
            denoiser.eval()
            probe_metrics = probe.measure()
            denoiser.train()
        probe_times.append(watch.seconds)
        with Stopwatch(device) as watch, torch.inference_mode():
            denoiser.eval()
            inference_metrics = probe.measure()
            denoiser.train()
        inference_times.append(watch.seconds)
    same_probe_metrics = probe_metrics == inference_metrics

    # The probe runs under no_grad, so its policy pass must record no autograd graph; the JSON
    # records whether it does.
    with torch.no_grad():
        _, prediction, _ = pair_errors(probe.adapter, probe.batch, probe.noise, probe.sigmas, reference=False)
        probe_records_graph = bool(prediction.requires_grad)
    del prediction

    checkpoint_times = _time_checkpoints(pgdpo, sizes.diagnostic_reps)
    rows = {
        "loss_metrics": (metric_s, 1),
        "grad_norm_and_clip": (phases["grad_norm_clip"], 1),
        "probe_measure": (statistics.median(probe_times), cfg.probe_every),
        "probe_measure_in_inference_mode": (statistics.median(inference_times), cfg.probe_every),
        "checkpoint_save": (statistics.median(checkpoint_times), cfg.checkpoint_every or math.inf),
    }
    if sizes.time_mlflow:
        train_metrics = {f"train/{key}": value for key, value in probe_metrics.items()}
        log_times, probe_log_times = _time_mlflow_logging(train_metrics, sizes.diagnostic_reps)
        rows["mlflow_log_train_metrics"] = (statistics.median(log_times), cfg.log_every)
        rows["mlflow_log_probe_metrics"] = (statistics.median(probe_log_times), cfg.probe_every)
    costs = {
        name: {"seconds_per_call": seconds, "every_steps": every, "share_of_step": seconds / every / step_s}
        for name, (seconds, every) in rows.items()
    }
    return {
        "pgdpo_step_median_s": step_s,
        "probe_pairs": sizes.probe_pairs,
        "probe_rows": len(probe.batch),
        "probe_every": cfg.probe_every,
        "probe_share_of_training": costs["probe_measure"]["share_of_step"],
        "probe_target_share": 0.05,
        "probe_records_autograd_graph": probe_records_graph,
        "probe_share_in_inference_mode": costs["probe_measure_in_inference_mode"]["share_of_step"],
        "probe_inference_mode_metrics_equal": same_probe_metrics,
        "costs": costs,
    }


def _time_mlflow_logging(metrics: dict[str, float], reps: int) -> tuple[list[float], list[float]]:
    """Time `Tracker.log_metrics` against a fresh sqlite MLflow store, as a stage logs."""
    import mlflow

    from pgdpo.tracking import Tracker

    train_times, probe_times = [], []
    with tempfile.TemporaryDirectory(prefix="bench-mlflow-") as folder:
        mlflow.set_tracking_uri(f"sqlite:///{Path(folder) / 'mlflow.db'}")
        mlflow.set_experiment("bench")
        with mlflow.start_run() as run:
            tracker = Tracker(run.info.run_id)
            for step in range(reps):
                with Stopwatch(torch.device("cpu")) as watch:
                    tracker.log_metrics(metrics, step=step)
                train_times.append(watch.seconds)
                with Stopwatch(torch.device("cpu")) as watch:
                    tracker.log_metrics({key.replace("train/", "probe/"): v for key, v in metrics.items()}, step=step)
                probe_times.append(watch.seconds)
    return train_times, probe_times


def _time_checkpoints(pgdpo: PgdpoPath, reps: int) -> list[float]:
    generator = torch.Generator().manual_seed(0)
    schedule = torch.optim.lr_scheduler.LambdaLR(pgdpo.optimizer, lambda step: 1.0)
    times = []
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as folder:
        for step in range(1, reps + 1):
            with Stopwatch(torch.device("cpu")) as watch:
                save_checkpoint(Path(folder), step, pgdpo.adapter.denoiser, pgdpo.optimizer, schedule, generator, [], [])
            times.append(watch.seconds)
    return times


# ----- report ---------------------------------------------------------------------------------


def build_tables(results: dict) -> dict[str, str]:
    step_rows, memory_rows, diagnostic_rows = [], [], []
    for model, entry in results["models"].items():
        steps = entry["steps"]
        step_rows.append([
            model,
            steps["times"]["baseline"]["median_s"] * 1000,
            steps["times"]["pgdpo"]["median_s"] * 1000,
            steps["speedup_ratio_of_medians"],
            steps["speedup_median_of_rep_ratios"],
            "yes" if steps["speedup_ratio_of_medians"] >= 2 else "no",
            steps["loss_max_abs_diff"],
            "yes" if steps["losses_match"] else "no",
        ])
        for path_name, memory in entry["memory"].items():
            memory_rows.append([
                model, path_name, memory["peak_bytes"] / MIB, memory["path_peak_bytes"] / MIB,
                memory["increase_during_steps_bytes"] / MIB, sum(memory["model_bytes"].values()) / MIB,
            ])
        diagnostics = entry["diagnostics"]
        for name, cost in diagnostics["costs"].items():
            diagnostic_rows.append([model, name, cost["seconds_per_call"] * 1000, cost["every_steps"],
                                    100 * cost["share_of_step"]])
    tables = {}
    kernel_rows = [
        [model, entry["steps"]["times"]["pgdpo_stock_kernels"]["median_s"] * 1000, k["baseline_over_stock_kernels"],
         k["stock_kernels_over_pgdpo"], k["loss_max_abs_diff_vs_baseline"]]
        for model, entry in results["models"].items()
        if (k := entry["steps"].get("kernels"))
    ]
    tables["pgdpo step with diffusers' and peft's kernels (ratios against the median steps above)"] = format_table(
        ["model", "stock-kernel pgdpo ms", "baseline / stock-kernel pgdpo", "stock-kernel pgdpo / pgdpo",
         "max abs loss diff vs baseline"], kernel_rows)
    compiled_rows = [
        [model, entry["steps"]["times"]["pgdpo_compiled"]["median_s"] * 1000, c["speedup_over_baseline"],
         c["speedup_over_eager_pgdpo"], c["compile_s"], c["break_even_steps_vs_eager_pgdpo"], c["loss_max_rel_diff"]]
        for model, entry in results["models"].items()
        if (c := entry["steps"].get("compiled"))
    ]
    if compiled_rows:
        tables["pgdpo step with train.compile (ratios against the median steps above)"] = format_table(
            ["model", "compiled ms", "baseline / compiled", "eager pgdpo / compiled", "compile s",
             "break-even steps vs eager", "max rel loss diff vs baseline"], compiled_rows)
    return {
        "Training step (median per step; ratio = baseline / pgdpo)": format_table(
            ["model", "baseline ms", "pgdpo ms", "ratio of medians", "median of rep ratios", ">= 2x",
             "max abs loss diff", "losses equal"], step_rows),
        "Peak memory (MiB)": format_table(
            ["model", "path", "peak", "peak above pre-build", "increase during steps", "model weights held"],
            memory_rows),
        "Diagnostics (share of the pgdpo step time, amortised over their interval)": format_table(
            ["model", "diagnostic", "ms per call", "every N steps", "% of training"], diagnostic_rows),
    } | tables


def main() -> None:
    setup_logging()

    def options(parser) -> None:
        add_models_option(parser, list(MODELS))
        parser.add_argument("--reps", type=int, default=20, help="timed steps per path and model (full run)")
        parser.add_argument("--compile", action="store_true",
                            help="also time pgdpo's step with the denoiser under torch.compile (train.compile)")

    args = parse_args(__doc__.splitlines()[0], options)
    inductor_cache = use_fresh_inductor_cache() if args.compile else None
    if args.models is None:
        args.models = ["tiny_wan"] if args.smoke else list(MODELS)
    params = load_params(ROOT / "params.yaml")
    sizes = sizes_for(args, params)
    result = result_header("train_step", args)
    result["sizes"] = sizes.__dict__
    result["inductor_cache_dir"] = inductor_cache
    result["train_settings"] = {"method": params.train.method, "lora_rank": params.train.lora.rank,
                                "probe_every": params.train.probe_every, "log_every": params.train.log_every}

    # Memory first: the forked children must start before this process runs torch work.
    memory = measure_all_memory(args.models, args.device, sizes)
    result["models"] = {}
    for model in args.models:
        steps, pgdpo = compare_steps(model, args.device, params, sizes, compiled=args.compile)
        step_s = steps["times"]["pgdpo"]["median_s"]
        diagnostics = time_diagnostics(
            pgdpo, args.device, params, sizes, step_s, steps["loss_metrics_s"]["median_s"],
            steps["phases_median_s"]["pgdpo"],
        )
        result["models"][model] = {"description": MODELS[model].description, "steps": steps,
                                   "memory": memory[model], "diagnostics": diagnostics}
    finish(result, build_tables(result), args.out)


if __name__ == "__main__":
    main()
