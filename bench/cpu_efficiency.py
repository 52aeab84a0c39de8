"""Achieved FLOP/s of the training step as a fraction of this machine's measured matmul peak.

FLOPs of one step (policy forward, reference forward, backward) are counted with
`torch.utils.flop_counter.FlopCounterMode`, which counts matmuls, convolutions and attention
but not element-wise work. The step is then timed without the counter. The peak is the best
float32 FLOP/s of a square `torch.mm` measured in the same process with the same thread count.

    python -m bench.cpu_efficiency [--device cpu|cuda] [--smoke] [--out results.json]
"""

from __future__ import annotations

import logging
import statistics

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from bench.common import ROOT, add_models_option, Stopwatch, finish, format_table, parse_args, result_header, setup_logging
from bench.models import MODELS, render_pairs
from bench.paths import PATHS, step_inputs
from pgdpo.config import load_params

logger = logging.getLogger(__name__)


def matmul_peak(device: torch.device, size: int, reps: int) -> dict:
    """Measure float32 FLOP/s of an n x n matmul; 2 n^3 FLOPs per product."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device)
    b = torch.randn(size, size, generator=generator).to(device)
    torch.mm(a, b)  # warm-up
    rates = []
    for _ in range(reps):
        with Stopwatch(device) as watch:
            torch.mm(a, b)
        rates.append(2 * size**3 / watch.seconds)
    return {"size": size, "reps": reps, "peak_flops": max(rates), "median_flops": statistics.median(rates)}


def step_efficiency(model: str, path_name: str, args, batch_size: int, reps: int) -> dict:
    """Count the FLOPs of one step of `path_name` and time `reps` more steps."""
    params = load_params(ROOT / "params.yaml")
    clips = render_pairs(max(batch_size, 4), MODELS[model].spec, seed=0)
    path = PATHS[path_name](model, args.device, params, clips, batch_size)
    counter = FlopCounterMode(display=False)
    with counter:
        path.step(*step_inputs(path.adapter, clips, batch_size, seed=0))
    flops = counter.get_total_flops()

    times = []
    for rep in tqdm(range(reps), desc=f"flop/s {model} {path_name}", unit="step"):
        inputs = step_inputs(path.adapter, clips, batch_size, seed=1 + rep)
        with Stopwatch(args.device) as watch:
            path.step(*inputs)
        times.append(watch.seconds)
    step_s = statistics.median(times)
    return {"flops_per_step": flops, "step_median_s": step_s, "achieved_flops": flops / step_s, "reps": reps}


def main() -> None:
    setup_logging()

    def options(parser) -> None:
        add_models_option(parser, list(MODELS))
        parser.add_argument("--reps", type=int, default=10, help="timed steps per path (full run)")

    args = parse_args(__doc__.splitlines()[0], options)
    params = load_params(ROOT / "params.yaml")
    if args.smoke:
        models, batch_size, reps, size, peak_reps = args.models or ["tiny_wan"], 2, 2, 256, 5
    else:
        models, batch_size, reps, size, peak_reps = args.models or list(MODELS), params.train.batch_size, args.reps, 1024, 20

    result = result_header("cpu_efficiency", args)
    # Peak before and after the steps: other load on a shared machine shows as a gap between them.
    peak_before = matmul_peak(args.device, size, peak_reps)
    steps = {
        model: {path: step_efficiency(model, path, args, batch_size, reps) for path in PATHS} for model in models
    }
    peak_after = matmul_peak(args.device, size, peak_reps)
    peak = max(peak_before["peak_flops"], peak_after["peak_flops"])

    rows = []
    for model, paths in steps.items():
        for path, entry in paths.items():
            entry["fraction_of_peak"] = entry["achieved_flops"] / peak
            rows.append([model, path, entry["flops_per_step"] / 1e9, entry["step_median_s"] * 1000,
                         entry["achieved_flops"] / 1e9, 100 * entry["fraction_of_peak"]])
    result.update({
        "batch_size": batch_size,
        "matmul_peak": {"before": peak_before, "after": peak_after, "peak_flops": peak},
        "models": steps,
    })
    tables = {
        "Matmul peak (float32)": format_table(
            ["n", "before GFLOP/s", "after GFLOP/s"], [[size, peak_before["peak_flops"] / 1e9, peak_after["peak_flops"] / 1e9]]
        ),
        "Training step FLOP/s": format_table(
            ["model", "path", "GFLOP per step", "ms per step", "achieved GFLOP/s", "% of matmul peak"], rows
        ),
    }
    finish(result, tables, args.out)


if __name__ == "__main__":
    main()
