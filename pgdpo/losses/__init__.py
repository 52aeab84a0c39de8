"""Preference losses for diffusion models: Diffusion-DPO, PG-DPO and baselines.

Every loss is a pure function of per-sample denoising errors of shape (B,), one value per
preference pair, in its own module. `compute_loss` picks one by name from `LOSSES` and adds
the metrics. docs/method.md gives the formulas, sources and defaults.
"""

from pgdpo.losses.config import (
    IPR_FORMS,
    IPR_SWITCHES,
    METHODS,
    SDPO_SCOPES,
    ArsConfig,
    DpopConfig,
    IpoConfig,
    IprConfig,
    KtoConfig,
    LossConfig,
    MethodName,
    SdpoConfig,
    VideoDpoConfig,
)
from pgdpo.losses.dispatch import LossOutput, compute_loss
from pgdpo.losses.dpo import dpo_logit, dpo_loss
from pgdpo.losses.dpop import dpop_loss
from pgdpo.losses.ipo import ipo_loss
from pgdpo.losses.kto import kto_loss, kto_reference_point
from pgdpo.losses.pgdpo import ars_weight, ipr_gate, ipr_penalty, pgdpo_loss
from pgdpo.losses.registry import LOSSES
from pgdpo.losses.sdpo import safeguard_scale, sdpo_loss
from pgdpo.losses.sft import sft_loss
from pgdpo.losses.videodpo import margin_weight, videodpo_loss

__all__ = [
    "IPR_FORMS",
    "IPR_SWITCHES",
    "LOSSES",
    "METHODS",
    "SDPO_SCOPES",
    "ArsConfig",
    "DpopConfig",
    "IpoConfig",
    "IprConfig",
    "KtoConfig",
    "LossConfig",
    "LossOutput",
    "MethodName",
    "SdpoConfig",
    "VideoDpoConfig",
    "ars_weight",
    "compute_loss",
    "dpo_logit",
    "dpo_loss",
    "dpop_loss",
    "ipo_loss",
    "ipr_gate",
    "ipr_penalty",
    "kto_loss",
    "kto_reference_point",
    "margin_weight",
    "pgdpo_loss",
    "safeguard_scale",
    "sdpo_loss",
    "sft_loss",
    "videodpo_loss",
]
