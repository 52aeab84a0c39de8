"""Memory options of a loaded pipeline: where its components live and how its VAE runs.

Sampling stages (generate, label, evaluate) can use VAE slicing and tiling and diffusers'
model CPU offload. Training reads latents and prompt embeddings from the label cache, so it
can release the text encoders and the VAE and keep only the denoiser on the device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryOptions:
    """Placement and VAE settings of a loaded pipeline; every option defaults to off."""

    vae_slicing: bool = False  # VAE encodes and decodes one clip of a batch at a time
    vae_tiling: bool = False  # VAE works on overlapping spatial tiles, where the VAE class supports it
    cpu_offload: bool = False  # diffusers' enable_model_cpu_offload (CUDA only)
    release_frozen: bool = False  # training: drop the weights of every module except the denoiser


def place_pipeline(pipe, denoiser: torch.nn.Module, device: torch.device, options: MemoryOptions) -> None:
    """Move the pipeline's modules to `device` according to `options`, and configure its VAE."""
    if options.release_frozen:
        denoiser.to(device)
        release_frozen_modules(pipe, denoiser)
    elif options.cpu_offload and device.type == "cuda":
        # Each component moves to the GPU when its forward runs and back to the CPU afterwards.
        pipe.enable_model_cpu_offload(device=device)
        logger.info("model CPU offload enabled on %s", device)
    else:
        if options.cpu_offload:
            logger.warning("runtime.cpu_offload applies on CUDA only; ignored on %s, the whole pipeline stays there", device)
        pipe.to(device)
    configure_vae(pipe, options.vae_slicing, options.vae_tiling)


def release_frozen_modules(pipe, denoiser: torch.nn.Module) -> list[str]:
    """Move every pipeline module except `denoiser` to the meta device, which frees its weights.

    Configs and attributes stay, so the adapter still reads e.g. `pipe.vae.config`, but any
    forward pass of a released module fails. Returns the released component names.
    """
    released = []
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module) and component is not denoiser:
            component.to("meta")
            released.append(name)
    logger.info("released %s: training reads cached latents and prompt embeddings instead", ", ".join(released) or "nothing")
    return released


def configure_vae(pipe, slicing: bool, tiling: bool) -> None:
    """Enable VAE slicing and tiling where the pipeline's VAE class implements them; log where it does not."""
    vae = getattr(pipe, "vae", None)
    for option, enabled, method in (("vae_slicing", slicing, "enable_slicing"), ("vae_tiling", tiling, "enable_tiling")):
        if not enabled:
            continue
        name = type(vae).__name__
        try:
            getattr(vae, method)()
        except (AttributeError, NotImplementedError):
            logger.warning("runtime.%s: %s does not support it; the VAE runs without it", option, name)
            continue
        logger.info("runtime.%s enabled on %s", option, name)
