"""VideoDPO-style loss: Diffusion-DPO with a per-pair weight from the score margin.

VideoDPO (Liu et al. 2024, "VideoDPO: Omni-Preference Alignment for Video Diffusion
Generation", arXiv 2412.14167) re-weights preference pairs by the difference of their
scores. The weight function below is this project's choice, not the paper's formula,
which was not available when it was written.
"""

from __future__ import annotations

import torch

from pgdpo.losses.common import upcast
from pgdpo.losses.dpo import dpo_loss


def margin_weight(score_w: torch.Tensor, score_l: torch.Tensor, margin_ref: float, power: float,
                  max_weight: float) -> torch.Tensor:
    """Return the pair weight w = min(max_weight, (max(r_w - r_l, 0) / margin_ref) ** power), detached.

    A pair whose margin equals `margin_ref` gets weight 1, the weight of a plain dpo pair.
    A tie, or a pair whose scores contradict its label, gets weight 0, because the scorer
    gives no evidence for it. The weight is a fixed function of the two scores and does
    not depend on the rest of the batch, so it works with the batch size of 1 common in
    video training.

    Shapes: score_w, score_l (B,) -> weight (B,).
    """
    margin = upcast(score_w).detach() - upcast(score_l).detach()
    weight = (torch.clamp(margin, min=0.0) / margin_ref) ** power
    return torch.clamp(weight, max=max_weight)


def videodpo_loss(diff_w: torch.Tensor, diff_l: torch.Tensor, weight: torch.Tensor,
                  beta: float) -> torch.Tensor:
    """Compute the margin-weighted Diffusion-DPO loss per pair.

        L = w * (-log sigmoid(-(beta/2) * (D_w - D_l)))

    w comes from `margin_weight` and is detached here. Shapes: diff_w, diff_l, weight (B,)
    -> loss (B,).
    """
    return upcast(weight).detach() * dpo_loss(diff_w, diff_l, beta)
