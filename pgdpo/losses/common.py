"""Helpers shared by the loss functions: dtype promotion, error gaps and score margins.

Shapes: B is the number of preference pairs. Every per-sample tensor is (B,).
"""

from __future__ import annotations

import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Return `x` in float32, or unchanged when it is already float32 or float64.

    beta * D multiplies gaps of about 1e-3 by thousands, and bfloat16 keeps 8 significant
    bits (float16 keeps 11), so the product, the log-sigmoid and their gradients would lose
    most of their digits. Every loss therefore computes in at least float32. The cast is
    differentiable, so gradients still reach low-precision inputs.
    """
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.float()


def error_gap(policy_err: torch.Tensor, ref_err: torch.Tensor) -> torch.Tensor:
    """Return D = l_theta - l_ref per sample, in at least float32, with the reference detached.

    NOTE: errors that arrive in bfloat16 are already rounded to steps of 2^-7 = 0.0078 near 1,
    larger than the expected |D| of about 1e-3 (an estimate for flow-matching latents), so D
    from such errors is mostly 0 or one step. The trainer should reduce the per-sample
    squared error in float32 even under bf16 autocast.
    """
    return upcast(policy_err) - upcast(ref_err).detach()


def relative_margin(score_w: torch.Tensor, score_l: torch.Tensor, eps: float) -> torch.Tensor:
    """Return the relative score margin m = (r_w - r_l) / max(r_l + eps, eps), detached.

    Scores are expected to be min-max normalised to [0, 1], which makes r_l + eps >= eps and
    the clamp inactive. The clamp matters for un-normalised scores. A negative r_l, for
    example a log-probability, would make the denominator zero or negative. A pair that the
    scorer prefers would then get a negative margin, so its ARS weight alpha would fall
    below 0.5 and IPR would switch off. With the clamp, m keeps the sign of r_w - r_l.

    Shapes: score_w, score_l (B,) -> m (B,).
    """
    score_w = upcast(score_w).detach()
    score_l = upcast(score_l).detach()
    denominator = torch.clamp(score_l + eps, min=eps)
    return (score_w - score_l) / denominator
