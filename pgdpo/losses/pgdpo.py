"""PG-DPO loss: Diffusion-DPO with Adaptive Rejection Scaling (ARS) and Implicit Preference
Regularization (IPR) (Xu et al. 2025, "Beyond Reward Margin: Rethinking and Resolving
Likelihood Displacement in Diffusion Models via Video Generation", arXiv 2511.19049).

The paper names two failure modes of DPO. With a small reward margin the chosen and rejected
gradients nearly coincide, so pushing the rejected error up also pushes the chosen error up
(optimization conflict). ARS shrinks the rejected term for such pairs. With a large margin
DPO can widen the margin by pushing the rejected error up alone, while the chosen error stays
where it was (suboptimal maximization). IPR adds a term on the chosen sample alone for
such pairs.

The IPR formula, its mode switch and all default constants are a reconstruction, because the
paper's exact IPR form was not available. docs/method.md lists what is taken from the paper
and what is not.

NOTE: ARS implements the form this project attributes to the paper's Eq. 7. Only the
paper's abstract was checked, not the equation itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pgdpo.losses.common import relative_margin, upcast
from pgdpo.losses.config import IPR_FORMS, IPR_SWITCHES


def ars_weight(score_w: torch.Tensor, score_l: torch.Tensor, k1: float, eps: float) -> torch.Tensor:
    """Return the ARS weight alpha = sigmoid(K1 * (r_w - r_l) / (r_l + eps)) per pair, detached.

    alpha is 0.5 for a tie and approaches 1 as the relative margin grows, so near ties get
    about half the push on the rejected error. It carries no gradient: the scores come from
    an external scorer, not from the policy. The denominator is clamped as described in
    `relative_margin`.

    Shapes: score_w, score_l (B,) -> alpha (B,).
    """
    return torch.sigmoid(k1 * relative_margin(score_w, score_l, eps))


def ipr_gate(score_w: torch.Tensor, score_l: torch.Tensor, k2: float, eps: float,
             switch: str, tau: float) -> torch.Tensor:
    """Return the IPR mode switch gamma per pair, detached (a reconstruction, see module docstring).

    With m = (r_w - r_l) / (r_l + eps):
        switch='hard': gamma = 1 if m > K2 else 0
        switch='soft': gamma = sigmoid((m - K2) / tau)

    Shapes: score_w, score_l (B,) -> gamma (B,).
    """
    margin = relative_margin(score_w, score_l, eps)
    if switch == "hard":
        return (margin > k2).to(margin.dtype)
    if switch == "soft":
        return torch.sigmoid((margin - k2) / tau)
    raise ValueError(f"invalid switch={switch!r}: expected one of {list(IPR_SWITCHES)}")


def ipr_penalty(diff_w: torch.Tensor, beta: float, form: str) -> torch.Tensor:
    """Return the IPR penalty on the chosen sample alone, per pair (a reconstruction).

        form='nll':   -log sigmoid(-(beta/2) * D_w) = softplus((beta/2) * D_w)
        form='hinge': max(0, (beta/2) * D_w)

    Both push the chosen error below the reference's. The hinge is the limit of the nll form
    for large |D_w| and stops pushing once D_w < 0. It is scaled by beta/2, unlike a plain
    max(0, D_w), so that lambda has the same meaning in both forms.

    Shapes: diff_w (B,) -> penalty (B,).
    """
    logit = 0.5 * beta * upcast(diff_w)
    if form == "nll":
        return F.softplus(logit)
    if form == "hinge":
        return torch.clamp(logit, min=0.0)
    raise ValueError(f"invalid form={form!r}: expected one of {list(IPR_FORMS)}")


def pgdpo_loss(diff_w: torch.Tensor, diff_l: torch.Tensor, alpha: torch.Tensor, gamma: torch.Tensor,
               beta: float, lam: float, form: str) -> torch.Tensor:
    """Compute the PG-DPO loss per pair.

        L = -log sigmoid(-(beta/2) * (D_w - alpha * D_l)) + lam * gamma * P(D_w)

    The first term is ARS (Eq. 7 of Xu et al. 2025): alpha from `ars_weight` scales the
    rejected gap. P is the IPR penalty from `ipr_penalty` and gamma its switch from
    `ipr_gate`. With alpha = 1 and gamma = 0 the loss equals `dpo_loss` exactly.
    alpha and gamma are detached here, so no gradient flows into them.

    Shapes: diff_w, diff_l, alpha, gamma (B,) -> loss (B,).
    """
    diff_w = upcast(diff_w)
    diff_l = upcast(diff_l)
    alpha = upcast(alpha).detach()
    gamma = upcast(gamma).detach()

    ars_term = -F.logsigmoid(-0.5 * beta * (diff_w - alpha * diff_l))
    return ars_term + lam * gamma * ipr_penalty(diff_w, beta, form)
