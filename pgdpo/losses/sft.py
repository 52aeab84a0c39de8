"""Supervised fine-tuning baseline: the plain denoising loss on the chosen samples."""

from __future__ import annotations

import torch

from pgdpo.losses.common import upcast


def sft_loss(policy_err_w: torch.Tensor) -> torch.Tensor:
    """Return the policy's denoising error on each chosen sample, L = l_theta(x_w).

    This is ordinary diffusion training on the preferred videos. It ignores the rejected
    samples and the reference model. Shapes: policy_err_w (B,) -> loss (B,).
    """
    return upcast(policy_err_w)
