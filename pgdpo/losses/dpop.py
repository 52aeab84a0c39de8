"""DPO-Positive (DPOP) loss (Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference
Optimisation with DPO-Positive", arXiv 2402.13228), moved from token log-probabilities to
diffusion errors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pgdpo.losses.common import upcast


def dpop_loss(diff_w: torch.Tensor, diff_l: torch.Tensor, beta: float, lam: float) -> torch.Tensor:
    """Compute the DPOP loss per pair.

        L = -log sigmoid(-(beta/2) * ((D_w - D_l) + lam * max(0, D_w)))

    DPOP adds a penalty inside the sigmoid that is active only while the chosen sample is
    less likely under the policy than under the reference. For diffusion that is D_w > 0:
    the policy's chosen error is above the reference's. The penalty sits inside the beta/2
    bracket, as in the language-model form where beta multiplies the whole difference, so
    lam is unitless. While D_w > 0, the gradient on the chosen error is (1 + lam) times the
    dpo one. For lam = 0 or D_w <= 0 the loss equals `dpo_loss`.

    Shapes: diff_w, diff_l (B,) -> loss (B,).
    """
    diff_w = upcast(diff_w)
    diff_l = upcast(diff_l)
    penalty = torch.clamp(diff_w, min=0.0)
    return -F.logsigmoid(-0.5 * beta * ((diff_w - diff_l) + lam * penalty))
