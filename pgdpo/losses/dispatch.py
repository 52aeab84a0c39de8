"""`compute_loss`: validate the per-sample errors of a batch, run one preference loss, add metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pgdpo.losses.common import error_gap, upcast
from pgdpo.losses.config import METHODS, LossConfig
from pgdpo.losses.registry import LOSSES, PairBatch

logger = logging.getLogger(__name__)

# The un-normalised score warning is logged once per process, because the trainer calls
# compute_loss every step.
_warned_unnormalised_scores = False


@dataclass(frozen=True)
class LossOutput:
    """Loss of one batch of B preference pairs with its per-pair values and metrics.

    loss: scalar, the mean of loss_per_pair, with gradient.
    loss_per_pair: (B,), with gradient.
    metrics: plain floats. Every method reports loss, implicit_acc (share of pairs with
        D_w < D_l, ties count half), diff_chosen and diff_rejected (mean D_w and D_l),
        displacement_rate (share of pairs with D_w > 0, a chosen error above the
        reference's), reward_margin (mean of -beta * (D_w - D_l)), ars_alpha_mean,
        ars_alpha_min, ars_alpha_max (1.0 unless pgdpo runs with ARS) and ipr_active (share
        of pairs with gamma > 0.5, 0.0 unless pgdpo runs with IPR). kto adds
        kto_reference_point, videodpo adds videodpo_weight_mean and sdpo adds
        sdpo_lambda_mean.
    """

    loss: torch.Tensor
    loss_per_pair: torch.Tensor
    metrics: dict[str, float]


def compute_loss(
    method: str,
    cfg: LossConfig,
    *,
    policy_err_w: torch.Tensor,
    policy_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    score_w: torch.Tensor | None = None,
    score_l: torch.Tensor | None = None,
    policy_pred: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
) -> LossOutput:
    """Compute the preference loss `method` of one batch and its metrics.

    Args:
        method: one of METHODS ("dpo", "pgdpo", "dpop", "ipo", "kto", "sft", "videodpo", "sdpo").
        cfg: beta and the per-method constants.
        policy_err_w, policy_err_l: the policy's per-sample denoising error, the mean
            squared error over all latent elements, of the chosen and rejected samples,
            shape (B,). Both samples of a pair share the prompt, timestep and noise.
        ref_err_w, ref_err_l: the same errors for the frozen reference model, shape (B,).
            They are detached here, so no gradient reaches the reference.
        score_w, score_l: external scores of the pair, min-max normalised to [0, 1], shape
            (B,). Required by videodpo, and by pgdpo unless both ARS and IPR are disabled.
        policy_pred, target: the policy's outputs and the denoising targets, shape
            (2B, ...) with the B chosen samples first. Required by sdpo only.

    Every loss computes in float32, or float64 for float64 inputs, whatever the input dtype.

    Raises:
        ValueError: unknown method, tensors of the wrong shape or dtype, missing scores or
            predictions for a method that needs them, or non-finite scores.
    """
    if method not in LOSSES:
        raise ValueError(f"unknown method={method!r}; expected one of {list(METHODS)}")
    if not isinstance(cfg, LossConfig):
        raise TypeError(f"cfg must be a LossConfig, got {type(cfg).__name__}; build one with LossConfig.from_dict")

    # 1. Check the per-sample tensors and compute D = l_theta - l_ref in float32.
    num_pairs = _check_per_pair("policy_err_w", policy_err_w, None)
    _check_per_pair("policy_err_l", policy_err_l, num_pairs)
    _check_per_pair("ref_err_w", ref_err_w, num_pairs)
    _check_per_pair("ref_err_l", ref_err_l, num_pairs)
    batch = PairBatch(
        diff_w=error_gap(policy_err_w, ref_err_w),
        diff_l=error_gap(policy_err_l, ref_err_l),
        policy_err_w=upcast(policy_err_w),
        score_w=_checked_scores("score_w", score_w, num_pairs),
        score_l=_checked_scores("score_l", score_l, num_pairs),
        policy_pred=policy_pred,
        target=target,
    )

    # 2. Check what the chosen method needs beyond the errors.
    if _needs_scores(method, cfg) and (score_w is None or score_l is None):
        raise ValueError(
            f"method={method!r} needs score_w and score_l, the normalised scores of each pair "
            f"with shape ({num_pairs},); got score_w={_describe(score_w)}, score_l={_describe(score_l)}"
        )
    if method == "sdpo":
        _check_predictions(policy_pred, target, num_pairs)

    # 3. Run the loss and reduce over pairs.
    terms = LOSSES[method](batch, cfg)
    loss = terms.loss_per_pair.mean()
    metrics = _metrics(batch, cfg, loss, terms.alpha, terms.gamma, terms.extras)
    return LossOutput(loss=loss, loss_per_pair=terms.loss_per_pair, metrics=metrics)


def _describe(x: torch.Tensor | None) -> str:
    return "None" if x is None else f"tensor of shape {tuple(x.shape)}"


def _needs_scores(method: str, cfg: LossConfig) -> bool:
    if method == "videodpo":
        return True
    if method == "pgdpo":
        return cfg.ars.enabled or cfg.ipr.enabled
    return False


def _check_per_pair(name: str, x: torch.Tensor, num_pairs: int | None) -> int:
    """Raise ValueError unless `x` is a floating-point tensor of shape (B,); return B."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B,), got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must have a floating-point dtype, got {x.dtype}")
    if x.ndim != 1 or x.shape[0] == 0:
        raise ValueError(
            f"{name} must have shape (B,) with B >= 1, one value per pair, got shape {tuple(x.shape)}; "
            "reduce the per-element errors with a mean over every axis except the batch axis"
        )
    if num_pairs is not None and x.shape[0] != num_pairs:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected ({num_pairs},) like policy_err_w")
    return x.shape[0]


def _checked_scores(name: str, scores: torch.Tensor | None, num_pairs: int) -> torch.Tensor | None:
    """Check a score tensor, warn once about values outside [0, 1] and return it detached and upcast."""
    global _warned_unnormalised_scores
    if scores is None:
        return None
    _check_per_pair(name, scores, num_pairs)
    scores = upcast(scores).detach()

    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{name} contains {bad} non-finite value(s) out of {num_pairs}; scores must be finite")

    outside = int(((scores < 0) | (scores > 1)).sum())
    if outside and not _warned_unnormalised_scores:
        logger.warning(
            "%s has %d of %d value(s) outside [0, 1]; the losses expect min-max normalised scores. "
            "This warning is logged once per process.",
            name, outside, num_pairs,
        )
        _warned_unnormalised_scores = True
    return scores


def _check_predictions(policy_pred: torch.Tensor | None, target: torch.Tensor | None, num_pairs: int) -> None:
    expected = f"({2 * num_pairs}, ...) with the {num_pairs} chosen samples first"
    if policy_pred is None or target is None:
        raise ValueError(
            f"method='sdpo' needs policy_pred and target of shape {expected}; "
            f"got policy_pred={_describe(policy_pred)}, target={_describe(target)}"
        )
    for name, x in (("policy_pred", policy_pred), ("target", target)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point torch.Tensor of shape {expected}")
        if x.ndim < 2 or x.shape[0] != 2 * num_pairs:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {expected}")
    if policy_pred.shape != target.shape:
        raise ValueError(
            f"policy_pred has shape {tuple(policy_pred.shape)} but target has shape {tuple(target.shape)}; "
            "they must match"
        )


@torch.no_grad()
def _metrics(batch: PairBatch, cfg: LossConfig, loss: torch.Tensor, alpha: torch.Tensor | None,
             gamma: torch.Tensor | None, extras: dict[str, torch.Tensor]) -> dict[str, float]:
    """Return the metrics as floats, with a single device-to-host copy."""
    diff_w = batch.diff_w.detach()
    diff_l = batch.diff_l.detach()
    neutral_alpha = torch.ones((), dtype=diff_w.dtype, device=diff_w.device)
    no_ipr = torch.zeros_like(neutral_alpha)

    wins = (diff_w < diff_l).to(diff_w.dtype) + 0.5 * (diff_w == diff_l).to(diff_w.dtype)
    values = {
        "loss": loss.detach(),
        "implicit_acc": wins.mean(),
        "diff_chosen": diff_w.mean(),
        "diff_rejected": diff_l.mean(),
        "displacement_rate": (diff_w > 0).to(diff_w.dtype).mean(),
        "reward_margin": (-cfg.beta * (diff_w - diff_l)).mean(),
        "ars_alpha_mean": alpha.mean() if alpha is not None else neutral_alpha,
        "ars_alpha_min": alpha.min() if alpha is not None else neutral_alpha,
        "ars_alpha_max": alpha.max() if alpha is not None else neutral_alpha,
        "ipr_active": (gamma > 0.5).to(diff_w.dtype).mean() if gamma is not None else no_ipr,
    }
    values.update(extras)

    stacked = torch.stack([value.detach().to(torch.float64).reshape(()) for value in values.values()])
    return dict(zip(values, stacked.cpu().tolist()))
