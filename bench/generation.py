"""Benchmark candidate sampling: batched multi-candidate calls against one video per call.

Both modes sample the same (prompt, seed) list through `VideoModelAdapter.generate`, which the
`generate` and `evaluate` stages use, and run interleaved in one process. Each clip has its own
seeded generator, so the outputs should match; the script reports how many uint8 values are
equal and the largest difference. MP4 writing is not timed.

    python -m bench.generation [--device cpu|cuda] [--smoke] [--compile] [--out results.json]
"""

from __future__ import annotations

import logging
import math
import statistics

import numpy as np
from tqdm.auto import tqdm

from bench.common import (
    ROOT,
    Stopwatch,
    add_models_option,
    finish,
    format_table,
    parse_args,
    result_header,
    setup_logging,
    summarise_times,
    use_fresh_inductor_cache,
)
from bench.models import MODELS, load_model, shapes_prompts
from pgdpo.config import load_params
from pgdpo.generation import candidate_seeds
from pgdpo.models.compile import compile_denoiser

logger = logging.getLogger(__name__)

# Batched and one-per-call outputs count as equal if no uint8 value differs by more than this.
# Batching changes the order of float sums, which can move a value across a rounding boundary.
MAX_UINT8_DIFF = 1


def compare_modes(
    model: str, args, prompts: list[str], num_candidates: int, steps: int, reps: int, compiled: bool = False
) -> dict:
    """Time every sampling mode on the same (prompt, seed) list and compare their outputs.

    With `compiled`, a second copy of the model samples under `torch.compile`
    (`runtime.compile_sampling`), in batches and one clip per call. One untimed call per compiled
    mode contains its compilation and is reported separately.
    """
    params = load_params(ROOT / "params.yaml")
    expanded = [prompt for prompt in prompts for _ in range(num_candidates)]
    seeds = candidate_seeds(len(prompts), num_candidates, params.generate.seed)
    batch_size = max(len(expanded), 1) if args.smoke else params.generate.batch_size

    eager = load_model(model, args.device, seed=0)
    modes = {"batched": (eager, batch_size), "one_per_call": (eager, 1)}
    if compiled:
        adapter = load_model(model, args.device, seed=0)
        compile_denoiser(adapter.denoiser)
        modes |= {"batched_compiled": (adapter, batch_size), "one_per_call_compiled": (adapter, 1)}

    def sample(mode: str) -> tuple[float, np.ndarray]:
        adapter, size = modes[mode]
        with Stopwatch(args.device) as watch:
            clips = adapter.generate(
                expanded, seeds, num_inference_steps=steps, guidance_scale=params.generate.guidance_scale,
                batch_size=size, desc=mode,
            )
        return watch.seconds, clips

    first_call = {mode: sample(mode)[0] for mode in modes if mode.endswith("_compiled")}
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    outputs: dict[str, np.ndarray] = {}
    for rep in tqdm(range(reps), desc=f"generation {model}", unit="rep"):
        order = list(modes) if rep % 2 == 0 else list(reversed(modes))
        for mode in order:
            seconds, outputs[mode] = sample(mode)
            times[mode].append(seconds)

    medians = {mode: statistics.median(values) for mode, values in times.items()}
    per_rep = [one / batched for batched, one in zip(times["batched"], times["one_per_call"])]
    result = {
        "videos": len(expanded),
        "prompts": len(prompts),
        "candidates_per_prompt": num_candidates,
        "num_inference_steps": steps,
        "batch_size": batch_size,
        "reps": reps,
        "times": {mode: summarise_times(values) for mode, values in times.items()},
        "videos_per_second": {mode: len(expanded) / median for mode, median in medians.items()},
        "speedup_ratio_of_medians": medians["one_per_call"] / medians["batched"],
        "speedup_median_of_rep_ratios": statistics.median(per_rep),
        "uint8_tolerance": MAX_UINT8_DIFF,
        **output_difference(outputs["batched"], outputs["one_per_call"]),
    }
    if compiled:
        result["compiled"] = compiled_summary(medians, first_call, outputs, len(expanded))
    return result


def output_difference(clips: np.ndarray, reference: np.ndarray) -> dict:
    """Return how far two sets of uint8 clips of the same (prompt, seed) list are apart."""
    difference = np.abs(clips.astype(np.int16) - reference.astype(np.int16))
    return {
        "outputs_identical": bool(difference.max() == 0),
        "equal_value_fraction": float((difference == 0).mean()),
        "differing_values": int((difference != 0).sum()),
        "total_values": int(difference.size),
        "max_uint8_diff": int(difference.max()),
        "outputs_equal_within_tolerance": bool(difference.max() <= MAX_UINT8_DIFF),
    }


def compiled_summary(medians: dict[str, float], first_call: dict[str, float], outputs: dict[str, np.ndarray],
                     videos: int) -> dict:
    """Return the speed of the compiled modes against the eager ones, their compile cost and output gap."""
    summary = {}
    for mode, eager_mode in (("batched_compiled", "batched"), ("one_per_call_compiled", "one_per_call")):
        compile_s = first_call[mode] - medians[mode]
        saved_per_video = (medians[eager_mode] - medians[mode]) / videos
        summary[mode] = {
            "speedup_over_eager_one_per_call": medians["one_per_call"] / medians[mode],
            "speedup_over_same_mode_eager": medians[eager_mode] / medians[mode],
            "compile_s": compile_s,
            "break_even_videos": compile_s / saved_per_video if saved_per_video > 0 else math.inf,
            **output_difference(outputs[mode], outputs["batched"]),
        }
    summary["batched_over_one_per_call_both_compiled"] = medians["one_per_call_compiled"] / medians["batched_compiled"]
    return summary


def main() -> None:
    setup_logging()

    def options(parser) -> None:
        add_models_option(parser, list(MODELS))
        parser.add_argument("--prompts", type=int, default=8, help="prompts in the full run")
        parser.add_argument("--reps", type=int, default=3, help="timed repetitions per mode (full run)")
        parser.add_argument("--compile", action="store_true",
                            help="also time both modes with the denoiser under torch.compile (runtime.compile_sampling)")

    args = parse_args(__doc__.splitlines()[0], options)
    params = load_params(ROOT / "params.yaml")
    if args.smoke:
        models, prompts, candidates, steps, reps = args.models or ["tiny_wan"], 2, 2, 2, 1
    else:
        models, prompts, candidates = args.models or list(MODELS), args.prompts, params.generate.num_candidates
        steps, reps = params.generate.num_inference_steps, args.reps

    result = result_header("generation", args)
    result["inductor_cache_dir"] = use_fresh_inductor_cache() if args.compile else None
    result["models"] = {}
    rows, compiled_rows = [], []
    for model in models:
        entry = compare_modes(model, args, shapes_prompts(prompts), candidates, steps, reps, compiled=args.compile)
        entry["description"] = MODELS[model].description
        result["models"][model] = entry
        rows.append([
            model, entry["videos"], entry["num_inference_steps"], entry["batch_size"],
            entry["videos_per_second"]["batched"], entry["videos_per_second"]["one_per_call"],
            entry["speedup_ratio_of_medians"], "yes" if entry["speedup_ratio_of_medians"] >= 3 else "no",
            entry["max_uint8_diff"], f"{entry['differing_values']} of {entry['total_values']}",
        ])
        for mode, summary in entry.get("compiled", {}).items():
            if isinstance(summary, dict):
                compiled_rows.append([
                    model, mode, entry["videos_per_second"][mode], summary["speedup_over_eager_one_per_call"],
                    summary["speedup_over_same_mode_eager"], summary["compile_s"], summary["break_even_videos"],
                    summary["max_uint8_diff"],
                ])
    tables = {"Generation (same prompts and seeds in both modes)": format_table(
        ["model", "videos", "steps", "batch", "batched videos/s", "one-per-call videos/s", "ratio", ">= 3x",
         "max uint8 diff", "differing uint8 values"],
        rows,
    )}
    if compiled_rows:
        tables["Sampling with runtime.compile_sampling (uint8 difference against eager batched)"] = format_table(
            ["model", "mode", "videos/s", "eager one-per-call / compiled", "same mode eager / compiled", "compile s",
             "break-even videos", "max uint8 diff"],
            compiled_rows,
        )
    finish(result, tables, args.out)


if __name__ == "__main__":
    main()
