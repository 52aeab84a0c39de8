"""Faster forward passes of peft's LoRA linear layers, chosen per layer.

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: besides the three matrix
products, one multiplication and one addition over the whole output, and the same again in the
backward pass. pgdpo offers two equivalent forms:

- `fused`: scale the rank-r intermediate instead of the output, and let the second product add
  itself to the base output (`addmm`). Same products, two fewer passes over the output.
- `merged`: build `W + scaling * B @ A` and run one linear layer. The backward pass then forms
  the full weight gradient, an extra product of the layer's size, and saves the LoRA branch.
  That pays off for narrow layers only. `python -m bench.lora_forward` measured the crossover
  on CPU at about 256x256 weights, for ranks 4 to 32.

`auto` picks `merged` for layers of at most `MERGE_MAX_WEIGHT` weights and `fused` for the rest.
A layer falls back to peft's own forward whenever a form does not apply. That is the case with
adapters disabled or merged into the weights, several active adapters, dropout, LoRA variants
(DoRA), per-sample adapter names and autocast. It is also the case when the base weights have
another dtype than the LoRA weights (bf16 models with float32 LoRA), because adding the small
LoRA update to bf16 weights would round it away.
NOTE: the forms round differently from peft's. Layer outputs differed by up to 1e-6 relative
(`bench.lora_forward`), and the PG-DPO loss, which multiplies error differences by beta, by up
to 7e-5 on the benchmark models (`bench.train_step`).
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from pgdpo.config import LoraForward

logger = logging.getLogger(__name__)

# Largest weight (in_features * out_features) that `auto` runs merged: 256x256.
MERGE_MAX_WEIGHT = 256 * 256


class FastLoraLinear(PeftLoraLinear):
    """peft's LoRA `Linear` with the `merged` or `fused` forward; see the module docstring.

    Instances are made by `set_lora_forward`, which swaps the class of existing layers, so
    state-dict keys, saving, `disable_adapters` and peft's merging work as before.
    """

    lora_form: str = "fused"

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self._single_plain_adapter(x, args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)

        base = self.get_base_layer()
        lora_a = self.lora_A[adapter].weight
        lora_b = self.lora_B[adapter].weight
        scaling = self.scaling[adapter]

        if self.lora_form == "merged":
            weight = torch.addmm(base.weight, lora_b, lora_a, alpha=scaling)
            return F.linear(x, weight, base.bias)

        flat = x.reshape(-1, x.shape[-1])
        output = F.linear(flat, base.weight, base.bias)
        hidden = flat @ lora_a.t()
        if scaling != 1:
            hidden = hidden * scaling
        output = torch.addmm(output, hidden, lora_b.t())
        return output.view(*x.shape[:-1], output.shape[-1])

    def _single_plain_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """Return the active adapter's name if this call fits the fast forms, else None."""
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        # Transposed (Conv1D-style) base weights would need the products the other way round.
        if self.fan_in_fan_out:
            return None
        # Under autocast the products would run in bf16 or fp16, merged weights included.
        if torch.is_autocast_enabled(x.device.type):
            return None
        adapter = self.active_adapters[0]
        if adapter not in self.lora_A or adapter in self.lora_variant:
            return None
        if not isinstance(self.lora_dropout[adapter], torch.nn.Identity):
            return None
        weight = self.get_base_layer().weight
        if not (x.dtype == weight.dtype == self.lora_A[adapter].weight.dtype):
            return None
        return adapter


def lora_form(layer: PeftLoraLinear, mode: LoraForward) -> str:
    """Return the forward form `mode` gives `layer`: 'merged', 'fused' or 'peft'."""
    if mode != "auto":
        return mode
    base = layer.get_base_layer()
    return "merged" if base.in_features * base.out_features <= MERGE_MAX_WEIGHT else "fused"


def set_lora_forward(denoiser: torch.nn.Module, mode: LoraForward) -> dict[str, int]:
    """Give each peft LoRA linear layer of `denoiser` the forward `mode` selects, in place.

    Returns how many layers got each form. Layer types other than `Linear` (convolutions,
    embeddings) keep peft's forward.
    """
    if mode not in LoraForward.__args__:
        raise ValueError(
            f"invalid LoRA forward {mode!r}: set train.lora.forward to one of {list(LoraForward.__args__)}"
        )
    counts: Counter[str] = Counter()
    for module in denoiser.modules():
        # Exact types only: peft's subclasses (quantized layers) keep their own forward.
        if type(module) not in (PeftLoraLinear, FastLoraLinear):
            continue
        form = lora_form(module, mode)
        if form == "peft":
            module.__class__ = PeftLoraLinear
        else:
            module.__class__ = FastLoraLinear
            module.lora_form = form
        counts[form] += 1
    logger.info("LoRA forward %r: %s", mode, dict(counts) or "no LoRA linear layers")
    return dict(counts)
