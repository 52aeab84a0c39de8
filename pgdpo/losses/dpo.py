"""Diffusion-DPO loss (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference
Optimization", arXiv 2311.12908)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pgdpo.losses.common import upcast


def dpo_logit(diff_w: torch.Tensor, diff_l: torch.Tensor, beta: float) -> torch.Tensor:
    """Return the Diffusion-DPO logit h = -(beta/2) * (D_w - D_l) per pair.

    h > 0 means that the policy, relative to the reference, denoises the chosen sample
    better than the rejected one. Shapes: diff_w, diff_l (B,) -> h (B,).
    """
    return -0.5 * beta * (upcast(diff_w) - upcast(diff_l))


def dpo_loss(diff_w: torch.Tensor, diff_l: torch.Tensor, beta: float) -> torch.Tensor:
    """Compute the Diffusion-DPO loss per pair.

        L = -log sigmoid(-(beta/2) * (D_w - D_l))

    D = l_theta - l_ref is the gap between the policy's and the reference's per-sample
    denoising error (mean squared error over all latent elements), for the chosen (w) and
    rejected (l) sample under the same timestep and noise. The per-timestep weight of
    Wallace et al. is constant here and absorbed into beta. The factor 1/2 follows public
    Diffusion-DPO training code (for example AIDC-AI/Diffusion-SDPO, train.py), so beta
    values carry over from it.

    Shapes: diff_w, diff_l (B,) -> loss (B,).
    """
    return -F.logsigmoid(dpo_logit(diff_w, diff_l, beta))
