"""Diffusion-SDPO loss (Fu et al. 2025, "Diffusion-SDPO: Safeguarded Direct Preference
Optimization for Diffusion Models", arXiv 2511.03317).

Derivation of the safeguard. With the loser gradient scaled by lambda, one SGD step of the
dpo loss moves the parameters by -eta * c * (G_w - lambda * G_l), where c > 0 is the
sigmoid weight of the pair and G_w, G_l are the parameter gradients of the chosen and
rejected errors. To first order the chosen error changes by

    -eta * c * (|G_w|^2 - lambda * <G_w, G_l>).

Asking for a change of at most -eta * c * mu * |G_w|^2 (mu = 0 forbids any increase) gives

    lambda <= (1 - mu) * |G_w|^2 / <G_w, G_l>   when <G_w, G_l> > 0,

and no limit when <G_w, G_l> <= 0. lambda is then clipped to [0, 1].

Approximation used here. Parameter gradients are not available per sample without extra
backward passes, so G is replaced by the gradient with respect to the model output,
g = d l / d pred = 2 (pred - target) / N, N being the number of elements per sample. This
treats the Jacobians of the two outputs as equal and isotropic (J_w J_l^T = J_w J_w^T = c I).
That is roughly true when the two inputs are close, and not in general. The factor 2 / N
cancels in the ratio, so lambda is computed from the residuals pred - target. The guarantee
is first order only, so a finite step can still raise the chosen error. The public Diffusion-SDPO
training code (AIDC-AI/Diffusion-SDPO, train.py) makes the same output-space approximation
with one lambda per batch, which is scope='batch' here.
"""

from __future__ import annotations

import torch

from pgdpo.losses.common import upcast
from pgdpo.losses.config import SDPO_SCOPES
from pgdpo.losses.dpo import dpo_loss


def safeguard_scale(policy_pred: torch.Tensor, target: torch.Tensor, mu: float, scope: str) -> torch.Tensor:
    """Return the loser-gradient scale lambda in [0, 1] per pair, detached.

    lambda = clip((1 - mu) * <r_w, r_w> / <r_w, r_l>, 0, 1) when <r_w, r_l> > 0, else 1,
    with residuals r = pred - target (see the module docstring for the derivation and the
    approximation). scope='pair' computes one lambda per pair from that pair's residuals.
    scope='batch' computes one lambda from all residuals of the batch flattened together
    and repeats it for every pair. Both scopes ignore cross-pair terms and the per-pair
    sigmoid weights.

    Shapes: policy_pred, target (2B, ...) with the B chosen samples first -> lambda (B,).
    """
    residual = upcast(policy_pred).detach() - upcast(target).detach()
    residual = residual.flatten(start_dim=1)  # (2B, N)
    residual_w, residual_l = residual.chunk(2)  # chosen first: (B, N) each
    num_pairs = residual_w.shape[0]

    if scope == "pair":
        winner_norm = (residual_w * residual_w).sum(dim=1)  # (B,)
        alignment = (residual_w * residual_l).sum(dim=1)  # (B,)
    elif scope == "batch":
        winner_norm = (residual_w * residual_w).sum().expand(num_pairs)  # (B,)
        alignment = (residual_w * residual_l).sum().expand(num_pairs)  # (B,)
    else:
        raise ValueError(f"invalid scope={scope!r}: expected one of {list(SDPO_SCOPES)}")

    # Where alignment <= 0 the safe_alignment value is never selected. It only avoids a
    # division by zero or a negative denominator in the unused branch.
    safe_alignment = torch.where(alignment > 0, alignment, torch.ones_like(alignment))
    bound = torch.clamp((1.0 - mu) * winner_norm / safe_alignment, min=0.0, max=1.0)
    return torch.where(alignment > 0, bound, torch.ones_like(bound))


def sdpo_loss(diff_w: torch.Tensor, diff_l: torch.Tensor, scale: torch.Tensor, beta: float) -> torch.Tensor:
    """Compute the Diffusion-SDPO loss per pair: the dpo loss with the loser gradient scaled.

        D_l' = stop_grad(D_l) + lambda * (D_l - stop_grad(D_l))
        L    = -log sigmoid(-(beta/2) * (D_w - D_l'))

    D_l' has the value of D_l and the gradient lambda * dD_l, so the loss value equals
    `dpo_loss` and only the push on the rejected error shrinks. This keeps the logged loss
    comparable with dpo. The scale lambda comes from `safeguard_scale` and is detached here.

    Shapes: diff_w, diff_l, scale (B,) -> loss (B,).
    """
    diff_l = upcast(diff_l)
    scale = upcast(scale).detach()
    scaled_diff_l = diff_l.detach() + scale * (diff_l - diff_l.detach())
    return dpo_loss(diff_w, scaled_diff_l, beta)
