"""Forward plus backward time of one LoRA linear layer in each form of `train.lora.forward`.

A peft LoRA layer on a square `nn.Linear` runs peft's own forward, the `fused` form and the
`merged` form (`pgdpo.training.lora_forward`) on the same input and upstream gradient, for
several widths and ranks. The input requires a gradient, as it does inside a model whose earlier
layers carry adapters. `auto` in `train.lora.forward` merges layers up to the width where
`merged` stops being faster; this script is where that width comes from.

    python -m bench.lora_forward [--device cpu|cuda] [--smoke] [--out results.json]
"""

from __future__ import annotations

import logging
import statistics

import torch
from peft import LoraConfig, inject_adapter_in_model
from tqdm.auto import tqdm

from bench.common import Stopwatch, finish, format_table, parse_args, result_header, setup_logging
from pgdpo.training.lora_forward import MERGE_MAX_WEIGHT, set_lora_forward

logger = logging.getLogger(__name__)

FORMS = ("peft", "fused", "merged")


class _OneLayer(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def time_forms(width: int, rank: int, tokens: int, reps: int, device: torch.device) -> dict:
    """Median seconds of forward plus backward of each form, and the largest output difference."""
    torch.manual_seed(0)
    layer = _OneLayer(width)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"], init_lora_weights="gaussian"), layer)
    layer.to(device).requires_grad_(False)
    for name, parameter in layer.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(parameter, std=0.02)
            parameter.requires_grad_(True)
    x = torch.randn(tokens, width, device=device, requires_grad=True)
    upstream = torch.randn(tokens, width, device=device)

    outputs, times = {}, {}
    for form in FORMS:
        set_lora_forward(layer, form)
        for _ in range(2):  # warm-up
            layer(x).backward(upstream)
        seconds = []
        for _ in range(reps):
            with Stopwatch(device) as watch:
                layer(x).backward(upstream)
            seconds.append(watch.seconds)
        times[form] = statistics.median(seconds)
        outputs[form] = layer(x).detach()
    scale = outputs["peft"].abs().max().item()
    return {
        "width": width,
        "rank": rank,
        "tokens": tokens,
        "median_s": times,
        "merged_over_fused": times["merged"] / times["fused"],
        "max_rel_output_difference": {
            form: (outputs[form] - outputs["peft"]).abs().max().item() / scale for form in ("fused", "merged")
        },
    }


def main() -> None:
    setup_logging()

    def options(parser) -> None:
        parser.add_argument("--reps", type=int, default=20, help="timed passes per form (full run)")
        parser.add_argument("--tokens", type=int, default=3072, help="rows of the input (16 clips of 192 tokens)")

    args = parse_args(__doc__.splitlines()[0], options)
    if args.smoke:
        widths, ranks, reps, tokens = (32, 64), (8,), 3, 256
    else:
        widths, ranks, reps, tokens = (32, 64, 128, 256, 512, 1024), (4, 8, 32), args.reps, args.tokens

    cases = [(width, rank) for rank in ranks for width in widths]
    entries = [
        time_forms(width, rank, tokens, reps, args.device)
        for width, rank in tqdm(cases, desc="LoRA forms", unit="layer")
    ]

    result = result_header("lora_forward", args)
    result.update({"reps": reps, "tokens": tokens, "merge_max_weight": MERGE_MAX_WEIGHT, "layers": entries})
    rows = [
        [e["rank"], e["width"], *(1000 * e["median_s"][form] for form in FORMS), e["merged_over_fused"],
         "merged" if e["width"] ** 2 <= MERGE_MAX_WEIGHT else "fused"]
        for e in entries
    ]
    tables = {
        f"LoRA layer forward + backward, {tokens} tokens (ms)": format_table(
            ["rank", "width", *FORMS, "merged / fused", "auto picks"], rows
        )
    }
    finish(result, tables, args.out)


if __name__ == "__main__":
    main()
