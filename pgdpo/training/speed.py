"""Memory switch of the training denoiser: gradient checkpointing.

`pgdpo.models.compile` contains the other switch, torch.compile, which sampling uses too.
"""

from __future__ import annotations

import logging

import torch

from pgdpo.config import ParamsError

logger = logging.getLogger(__name__)


def enable_gradient_checkpointing(denoiser: torch.nn.Module) -> None:
    """Recompute the denoiser's block activations during backward instead of storing them."""
    if not getattr(denoiser, "_supports_gradient_checkpointing", False):
        raise ParamsError(
            f"train.gradient_checkpointing: {type(denoiser).__name__} does not support gradient "
            "checkpointing in diffusers; set train.gradient_checkpointing: false"
        )
    denoiser.enable_gradient_checkpointing()
    logger.info("gradient checkpointing enabled on %s", type(denoiser).__name__)
