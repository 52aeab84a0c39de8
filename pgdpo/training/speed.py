"""Speed and memory switches of the training denoiser: gradient checkpointing and torch.compile."""

from __future__ import annotations

import logging

import torch

from pgdpo.config import ParamsError

logger = logging.getLogger(__name__)

# Graphs one training run traces: the policy pass with gradients, the reference pass with the
# adapters disabled, the probe's policy pass without gradients, and each again for a smaller
# last micro-batch. torch keeps 8 graphs per function by default, which is enough for these.
# A run with more batch shapes would fall back to eager without an error, so the limit is raised.
COMPILE_CACHE_SIZE = 16


def enable_gradient_checkpointing(denoiser: torch.nn.Module) -> None:
    """Recompute the denoiser's block activations during backward instead of storing them."""
    if not getattr(denoiser, "_supports_gradient_checkpointing", False):
        raise ParamsError(
            f"train.gradient_checkpointing: {type(denoiser).__name__} does not support gradient "
            "checkpointing in diffusers; set train.gradient_checkpointing: false"
        )
    denoiser.enable_gradient_checkpointing()
    logger.info("gradient checkpointing enabled on %s", type(denoiser).__name__)


def compile_denoiser(denoiser: torch.nn.Module, mode: str = "default") -> None:
    """Compile the denoiser's forward with `torch.compile`, in place.

    `nn.Module.compile` keeps the module object and its state-dict keys, so LoRA saving,
    checkpoints and `disable_adapter` work as before. The first step of each graph pays the
    compilation (about a minute for the shapes-world base on 2 CPU cores, see BENCHMARKS.md).
    NOTE: compiled kernels sum in a different order than eager ones, so losses differ from an
    eager run by about 1e-4 relative. Two runs with the same `train.compile` give the same bytes.
    """
    import torch._dynamo
    import torch._inductor.config

    # `seed_everything` sets the kernel flag only; compiled kernels follow the same setting.
    torch._inductor.config.deterministic = torch.are_deterministic_algorithms_enabled()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, COMPILE_CACHE_SIZE)
    denoiser.compile(mode=mode, dynamic=False)
    logger.info("torch.compile(mode=%r) set on %s; the first steps include compilation", mode, type(denoiser).__name__)
