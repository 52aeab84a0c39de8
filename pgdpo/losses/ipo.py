"""IPO loss (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
Preferences", arXiv 2310.12036), moved from token log-probabilities to diffusion errors."""

from __future__ import annotations

import torch

from pgdpo.losses.dpo import dpo_logit


def ipo_loss(diff_w: torch.Tensor, diff_l: torch.Tensor, beta: float, tau: float) -> torch.Tensor:
    """Compute the IPO loss per pair.

        h = -(beta/2) * (D_w - D_l)
        L = (h - 1 / (2 * tau))^2

    IPO regresses the log-likelihood-ratio margin h onto the fixed target 1 / (2 tau)
    instead of pushing it to infinity as the sigmoid loss does. In the language-model
    form h is a difference of summed token log-ratios and has no beta. Here D is a mean
    over latent elements, so h keeps the beta/2 factor of the dpo logit to convert it to
    log-likelihood scale. The target 1 / (2 tau) is then in the same units as the dpo logit.

    Shapes: diff_w, diff_l (B,) -> loss (B,).
    """
    h = dpo_logit(diff_w, diff_l, beta)
    return (h - 1.0 / (2.0 * tau)) ** 2
