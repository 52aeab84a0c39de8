"""KTO loss for diffusion models, after Diffusion-KTO (Li et al. 2024, "Aligning Diffusion
Models by Optimizing Human Utility", arXiv 2404.04465), which applies the Kahneman-Tversky
objective of KTO (Ethayarajh et al. 2024, arXiv 2402.01306) to per-sample diffusion errors."""

from __future__ import annotations

import torch

from pgdpo.losses.common import upcast


def kto_reference_point(diff_w: torch.Tensor, diff_l: torch.Tensor) -> torch.Tensor:
    """Return the reference point z0 = max(0, mean(-D)) over all 2B samples, detached.

    KTO compares each implicit reward with a KL estimate between policy and reference,
    which is non-negative and carries no gradient. The batch mean of -D over the chosen and
    rejected samples replaces that estimate here. Shapes: diff_w, diff_l (B,) -> z0 ().
    """
    all_rewards = -torch.cat([upcast(diff_w), upcast(diff_l)]).detach()
    return torch.clamp(all_rewards.mean(), min=0.0)


def kto_loss(diff_w: torch.Tensor, diff_l: torch.Tensor, beta: float, lam_desirable: float,
             lam_undesirable: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the KTO loss per pair and return it with the reference point z0.

        z0  = max(0, mean over the 2B samples of -D), detached
        v_w = sigmoid(beta * (-D_w - z0))    chosen sample, labelled desirable
        v_l = sigmoid(beta * (z0 + D_l))     rejected sample, labelled undesirable
        L   = (lam_desirable * (1 - v_w) + lam_undesirable * (1 - v_l)) / 2

    KTO is unpaired: each sample is scored on its own against z0, so a pair only groups
    two independent terms. The per-pair loss is their mean, so that the mean over pairs
    equals the mean over all 2B samples. The logit uses the full implicit reward -beta * D,
    while the dpo logit uses half the reward difference, so a pair with D_w = -D_l and
    z0 = 0 has the same logit in both. z0 depends on the whole batch, so a pair's loss
    changes with the other pairs in it.

    Shapes: diff_w, diff_l (B,) -> loss (B,), z0 ().
    """
    diff_w = upcast(diff_w)
    diff_l = upcast(diff_l)
    z0 = kto_reference_point(diff_w, diff_l)

    value_w = torch.sigmoid(beta * (-diff_w - z0))
    value_l = torch.sigmoid(beta * (z0 + diff_l))
    loss = 0.5 * (lam_desirable * (1.0 - value_w) + lam_undesirable * (1.0 - value_l))
    return loss, z0
