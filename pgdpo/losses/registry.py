"""Registry of the preference losses: one adapter per method from validated inputs to per-pair losses.

Each adapter unpacks the constants it needs from LossConfig and calls the pure loss function
of its module. `compute_loss` in pgdpo.losses.dispatch validates the inputs, looks the method
up in LOSSES and adds the metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
import torch

from pgdpo.losses.config import METHODS, LossConfig
from pgdpo.losses.dpo import dpo_loss
from pgdpo.losses.dpop import dpop_loss
from pgdpo.losses.ipo import ipo_loss
from pgdpo.losses.kto import kto_loss
from pgdpo.losses.pgdpo import ars_weight, ipr_gate, pgdpo_loss
from pgdpo.losses.sdpo import safeguard_scale, sdpo_loss
from pgdpo.losses.sft import sft_loss
from pgdpo.losses.videodpo import margin_weight, videodpo_loss


@dataclass(frozen=True)
class PairBatch:
    """Validated inputs of one batch of B preference pairs, in float32 or float64.

    diff_w, diff_l: D = l_theta - l_ref per pair (B,), reference detached.
    policy_err_w: l_theta of the chosen samples (B,), used by sft.
    score_w, score_l: external scores (B,), or None when the caller gave none.
    policy_pred, target: model outputs and targets (2B, ...) with the chosen samples
        first, or None. Only sdpo reads them.
    """

    diff_w: torch.Tensor
    diff_l: torch.Tensor
    policy_err_w: torch.Tensor
    score_w: torch.Tensor | None = None
    score_l: torch.Tensor | None = None
    policy_pred: torch.Tensor | None = None
    target: torch.Tensor | None = None


@dataclass(frozen=True)
class MethodTerms:
    """Output of one adapter.

    loss_per_pair: (B,) with gradient. alpha, gamma: the PG-DPO ARS weight and IPR switch
    (B,), or None for other methods. extras: method-specific scalars for the metrics, such
    as the SDPO scale.
    """

    loss_per_pair: torch.Tensor
    alpha: torch.Tensor | None = None
    gamma: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


LossFn = Callable[[PairBatch, LossConfig], MethodTerms]


def _scores(batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    # compute_loss checks that score-based methods get scores, so None here is a bug.
    if batch.score_w is None or batch.score_l is None:
        raise RuntimeError("internal error: a score-based loss was called without scores")
    return batch.score_w, batch.score_l


def _run_dpo(batch: PairBatch, cfg: LossConfig) -> MethodTerms:
    return MethodTerms(dpo_loss(batch.diff_w, batch.diff_l, cfg.beta))


def _run_pgdpo(batch: PairBatch, cfg: LossConfig) -> MethodTerms:
    # Disabled parts use their neutral values (alpha = 1, gamma = 0), so with both parts off
    # the loss is dpo_loss exactly and no scores are needed.
    ones = torch.ones_like(batch.diff_w).detach()
    alpha = ones
    gamma = torch.zeros_like(ones)
    if cfg.ars.enabled:
        score_w, score_l = _scores(batch)
        alpha = ars_weight(score_w, score_l, cfg.ars.k1, cfg.ars.eps)
    if cfg.ipr.enabled:
        score_w, score_l = _scores(batch)
        gamma = ipr_gate(score_w, score_l, cfg.ipr.k2, cfg.ars.eps, cfg.ipr.switch, cfg.ipr.tau)

    loss = pgdpo_loss(batch.diff_w, batch.diff_l, alpha, gamma, cfg.beta, cfg.ipr.lam, cfg.ipr.form)
    return MethodTerms(loss, alpha=alpha, gamma=gamma)


def _run_dpop(batch: PairBatch, cfg: LossConfig) -> MethodTerms:
    return MethodTerms(dpop_loss(batch.diff_w, batch.diff_l, cfg.beta, cfg.dpop.lam))


def _run_ipo(batch: PairBatch, cfg: LossConfig) -> MethodTerms:
    return MethodTerms(ipo_loss(batch.diff_w, batch.diff_l, cfg.beta, cfg.ipo.tau))


def _run_kto(batch: PairBatch, cfg: LossConfig) -> MethodTerms:
    loss, reference_point = kto_loss(
        batch.diff_w, batch.diff_l, cfg.beta, cfg.kto.lam_desirable, cfg.kto.lam_undesirable
    )
    return MethodTerms(loss, extras={"kto_reference_point": reference_point})


def _run_sft(batch: PairBatch, cfg: LossConfig) -> MethodTerms:
    return MethodTerms(sft_loss(batch.policy_err_w))


def _run_videodpo(batch: PairBatch, cfg: LossConfig) -> MethodTerms:
    score_w, score_l = _scores(batch)
    weight = margin_weight(score_w, score_l, cfg.videodpo.margin_ref, cfg.videodpo.power,
                           cfg.videodpo.max_weight)
    loss = videodpo_loss(batch.diff_w, batch.diff_l, weight, cfg.beta)
    return MethodTerms(loss, extras={"videodpo_weight_mean": weight.mean()})


def _run_sdpo(batch: PairBatch, cfg: LossConfig) -> MethodTerms:
    if batch.policy_pred is None or batch.target is None:
        raise RuntimeError("internal error: sdpo was called without policy_pred and target")
    scale = safeguard_scale(batch.policy_pred, batch.target, cfg.sdpo.mu, cfg.sdpo.scope)
    loss = sdpo_loss(batch.diff_w, batch.diff_l, scale, cfg.beta)
    return MethodTerms(loss, extras={"sdpo_lambda_mean": scale.mean()})


LOSSES: dict[str, LossFn] = {
    "dpo": _run_dpo,
    "pgdpo": _run_pgdpo,
    "dpop": _run_dpop,
    "ipo": _run_ipo,
    "kto": _run_kto,
    "sft": _run_sft,
    "videodpo": _run_videodpo,
    "sdpo": _run_sdpo,
}

# The method names are defined once, in config.MethodName. This fails at import time if
# the registry and that list drift apart.
if tuple(LOSSES) != METHODS:
    raise RuntimeError(f"internal error: LOSSES keys {list(LOSSES)} differ from METHODS {list(METHODS)}")
