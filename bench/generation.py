"""Benchmark candidate sampling: batched multi-candidate calls against one video per call.

Both modes sample the same (prompt, seed) list through `VideoModelAdapter.generate`, which the
`generate` and `evaluate` stages use, and run interleaved in one process. Each clip has its own
seeded generator, so the outputs should match; the script reports how many uint8 values are
equal and the largest difference. MP4 writing is not timed.

    python -m bench.generation [--device cpu|cuda] [--smoke] [--out results.json]
"""

from __future__ import annotations

import logging
import statistics

import numpy as np
from tqdm.auto import tqdm

from bench.common import ROOT, add_models_option, Stopwatch, finish, format_table, parse_args, result_header, setup_logging, summarise_times
from bench.models import MODELS, load_model, shapes_prompts
from pgdpo.config import load_params
from pgdpo.generation import candidate_seeds

logger = logging.getLogger(__name__)

# Batched and one-per-call outputs count as equal if no uint8 value differs by more than this.
# Batching changes the order of float sums, which can move a value across a rounding boundary.
MAX_UINT8_DIFF = 1


def compare_modes(model: str, args, prompts: list[str], num_candidates: int, steps: int, reps: int) -> dict:
    params = load_params(ROOT / "params.yaml")
    adapter = load_model(model, args.device, seed=0)
    expanded = [prompt for prompt in prompts for _ in range(num_candidates)]
    seeds = candidate_seeds(len(prompts), num_candidates, params.generate.seed)
    batch_size = max(len(expanded), 1) if args.smoke else params.generate.batch_size
    modes = {"batched": batch_size, "one_per_call": 1}

    times: dict[str, list[float]] = {mode: [] for mode in modes}
    outputs: dict[str, np.ndarray] = {}
    for rep in tqdm(range(reps), desc=f"generation {model}", unit="rep"):
        order = list(modes) if rep % 2 == 0 else list(reversed(modes))
        for mode in order:
            with Stopwatch(args.device) as watch:
                clips = adapter.generate(
                    expanded, seeds, num_inference_steps=steps, guidance_scale=params.generate.guidance_scale,
                    batch_size=modes[mode], desc=f"{mode}",
                )
            times[mode].append(watch.seconds)
            outputs[mode] = clips

    difference = np.abs(outputs["batched"].astype(np.int16) - outputs["one_per_call"].astype(np.int16))
    rates = {mode: len(expanded) / statistics.median(values) for mode, values in times.items()}
    per_rep = [one / batched for batched, one in zip(times["batched"], times["one_per_call"])]
    return {
        "videos": len(expanded),
        "prompts": len(prompts),
        "candidates_per_prompt": num_candidates,
        "num_inference_steps": steps,
        "batch_size": batch_size,
        "reps": reps,
        "times": {mode: summarise_times(values) for mode, values in times.items()},
        "videos_per_second": rates,
        "speedup_ratio_of_medians": rates["batched"] / rates["one_per_call"],
        "speedup_median_of_rep_ratios": statistics.median(per_rep),
        "outputs_identical": bool(difference.max() == 0),
        "equal_value_fraction": float((difference == 0).mean()),
        "differing_values": int((difference != 0).sum()),
        "total_values": int(difference.size),
        "max_uint8_diff": int(difference.max()),
        "outputs_equal_within_tolerance": bool(difference.max() <= MAX_UINT8_DIFF),
        "uint8_tolerance": MAX_UINT8_DIFF,
    }


def main() -> None:
    setup_logging()

    def options(parser) -> None:
        add_models_option(parser, list(MODELS))
        parser.add_argument("--prompts", type=int, default=8, help="prompts in the full run")
        parser.add_argument("--reps", type=int, default=3, help="timed repetitions per mode (full run)")

    args = parse_args(__doc__.splitlines()[0], options)
    params = load_params(ROOT / "params.yaml")
    if args.smoke:
        models, prompts, candidates, steps, reps = args.models or ["tiny_wan"], 2, 2, 2, 1
    else:
        models, prompts, candidates = args.models or list(MODELS), args.prompts, params.generate.num_candidates
        steps, reps = params.generate.num_inference_steps, args.reps

    result = result_header("generation", args)
    result["models"] = {}
    rows = []
    for model in models:
        entry = compare_modes(model, args, shapes_prompts(prompts), candidates, steps, reps)
        entry["description"] = MODELS[model].description
        result["models"][model] = entry
        rows.append([
            model, entry["videos"], entry["num_inference_steps"], entry["batch_size"],
            entry["videos_per_second"]["batched"], entry["videos_per_second"]["one_per_call"],
            entry["speedup_ratio_of_medians"], "yes" if entry["speedup_ratio_of_medians"] >= 3 else "no",
            entry["max_uint8_diff"], f"{entry['differing_values']} of {entry['total_values']}",
        ])
    table = format_table(
        ["model", "videos", "steps", "batch", "batched videos/s", "one-per-call videos/s", "ratio", ">= 3x",
         "max uint8 diff", "differing uint8 values"],
        rows,
    )
    finish(result, {"Generation (same prompts and seeds in both modes)": table}, args.out)


if __name__ == "__main__":
    main()
