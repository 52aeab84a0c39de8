"""torch.compile of a pipeline's denoiser, shared by training (`train.compile`) and sampling
(`runtime.compile_sampling`)."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

# Graphs one process traces. Training: the policy pass with gradients, the reference pass with
# the adapters disabled, the probe's policy pass without gradients, and each again for a smaller
# last micro-batch. Sampling: one graph per batch size (full batches and the last one).
# torch keeps 8 graphs per function by default. A process with more shapes would fall back to
# eager without an error, so the limit is raised.
COMPILE_CACHE_SIZE = 16


def compile_denoiser(denoiser: torch.nn.Module, mode: str = "default") -> None:
    """Compile the denoiser's forward with `torch.compile`, in place.

    `nn.Module.compile` keeps the module object and its state-dict keys, so LoRA loading and
    saving, checkpoints and `disable_adapter` work as before. Compiling happens lazily, at the
    first forward pass of each input shape. For the shapes-world base on 2 CPU cores that took
    about a minute per training run and half a minute per sampling batch size (BENCHMARKS.md).
    NOTE: compiled kernels sum in a different order than eager ones, so losses differ from an
    eager run by about 1e-4 relative, and sampled clips by up to one uint8 level. Two runs with
    the same setting give the same bytes.
    """
    import torch._dynamo
    import torch._inductor.config

    # `seed_everything` sets only the kernel flag, and compiled kernels follow the same setting.
    torch._inductor.config.deterministic = torch.are_deterministic_algorithms_enabled()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, COMPILE_CACHE_SIZE)
    denoiser.compile(mode=mode, dynamic=False)
    logger.info("torch.compile(mode=%r) set on %s; the first passes include compilation", mode, type(denoiser).__name__)
