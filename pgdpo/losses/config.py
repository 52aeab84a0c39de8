"""Configuration of the preference losses: method names, beta and per-method constants.

Every choice list (method names, IPR form and switch, SDPO scope) is a `Literal` defined
here once. The matching tuple (`METHODS`, `IPR_FORMS`, ...) is derived from it with
`typing.get_args`, so validation and help text never drift from the type.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

MethodName = Literal["dpo", "pgdpo", "dpop", "ipo", "kto", "sft", "videodpo", "sdpo"]
METHODS: tuple[str, ...] = get_args(MethodName)

IprForm = Literal["nll", "hinge"]
IPR_FORMS: tuple[str, ...] = get_args(IprForm)

IprSwitch = Literal["hard", "soft"]
IPR_SWITCHES: tuple[str, ...] = get_args(IprSwitch)

SdpoScope = Literal["batch", "pair"]
SDPO_SCOPES: tuple[str, ...] = get_args(SdpoScope)


def _check_number(section: str, name: str, value: Any, *, minimum: float | None = None,
                  maximum: float | None = None, strict_minimum: bool = False,
                  strict_maximum: bool = False) -> None:
    """Raise ValueError unless `value` is a finite real number inside the given bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"invalid {section}.{name}={value!r}: expected a finite number")
    if minimum is not None and (value <= minimum if strict_minimum else value < minimum):
        relation = ">" if strict_minimum else ">="
        raise ValueError(f"invalid {section}.{name}={value!r}: expected a value {relation} {minimum}")
    if maximum is not None and (value >= maximum if strict_maximum else value > maximum):
        relation = "<" if strict_maximum else "<="
        raise ValueError(f"invalid {section}.{name}={value!r}: expected a value {relation} {maximum}")


def _check_bool(section: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"invalid {section}.{name}={value!r}: expected true or false")


def _check_choice(section: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"invalid {section}.{name}={value!r}: expected one of {list(choices)}")


@dataclass
class ArsConfig:
    """Adaptive Rejection Scaling (ARS) of PG-DPO: the per-pair weight on the rejected term."""

    enabled: bool = field(
        default=True,
        metadata={"help": "Weight the rejected term by alpha. If false, alpha is 1 for every pair."},
    )
    k1: float = field(
        default=5.0,
        metadata={
            "help": "Slope K1 of alpha = sigmoid(K1 * m) over the relative score margin m. "
            "5 maps m = 0.05 (a near tie) to alpha 0.56 and m = 1 to 0.993, so only near ties "
            "are damped. Not tuned: the value of Xu et al. 2025 was not available."
        },
    )
    eps: float = field(
        default=0.05,
        metadata={
            "help": "eps in the relative margin m = (r_w - r_l) / (r_l + eps), shared with IPR. "
            "Min-max normalisation maps the worst sample to r_l = 0, and 0.05 keeps m of such "
            "pairs finite (at most 20) and damps large relative margins between low, noisy scores."
        },
    )

    def __post_init__(self) -> None:
        _check_bool("ars", "enabled", self.enabled)
        # K1 <= 0 would make alpha <= 0.5 for every positive margin, which inverts ARS.
        _check_number("ars", "k1", self.k1, minimum=0.0, strict_minimum=True)
        _check_number("ars", "eps", self.eps, minimum=0.0, strict_minimum=True)


@dataclass
class IprConfig:
    """Implicit Preference Regularization (IPR) of PG-DPO: a chosen-only term for large margins.

    The form, the mode switch and all defaults are a reconstruction, because the exact IPR
    formula of Xu et al. 2025 (arXiv 2511.19049) was not available. docs/method.md explains
    the choices.
    """

    enabled: bool = field(
        default=True,
        metadata={"help": "Add the IPR term. If false, gamma is 0 for every pair."},
    )
    k2: float = field(
        default=1.0,
        metadata={
            "help": "Margin threshold K2: IPR switches on when m > K2. 1.0 means the chosen "
            "score is about twice the rejected one, where DPO can widen the margin by pushing "
            "the rejected error up alone."
        },
    )
    lam: float = field(
        default=1.0,
        metadata={
            "help": "Weight lambda of the IPR term. Both IPR forms are on the logit scale of the "
            "dpo term, so 1.0 gives the chosen-only term the same weight as the preference term."
        },
    )
    form: IprForm = field(
        default="nll",
        metadata={
            "help": f"IPR penalty, one of {list(IPR_FORMS)}: 'nll' is -log sigmoid(-(beta/2) D_w), "
            "'hinge' is max(0, (beta/2) D_w), which is zero once the chosen error is below the "
            "reference."
        },
    )
    switch: IprSwitch = field(
        default="hard",
        metadata={
            "help": f"Mode switch, one of {list(IPR_SWITCHES)}: 'hard' gives gamma = 1 if m > K2 "
            "else 0, 'soft' gives gamma = sigmoid((m - K2) / tau)."
        },
    )
    tau: float = field(
        default=0.1,
        metadata={
            "help": "Temperature of the soft switch, in margin units. 0.1 moves gamma from 0.27 "
            "to 0.73 over m in K2 +- 0.1. Used only with switch='soft'."
        },
    )

    def __post_init__(self) -> None:
        _check_bool("ipr", "enabled", self.enabled)
        _check_number("ipr", "k2", self.k2)
        _check_number("ipr", "lam", self.lam, minimum=0.0)
        _check_choice("ipr", "form", self.form, IPR_FORMS)
        _check_choice("ipr", "switch", self.switch, IPR_SWITCHES)
        _check_number("ipr", "tau", self.tau, minimum=0.0, strict_minimum=True)


@dataclass
class DpopConfig:
    """DPO-Positive (DPOP) baseline."""

    lam: float = field(
        default=5.0,
        metadata={
            "help": "Weight lambda of the penalty max(0, D_w) inside the sigmoid, in the same "
            "beta/2 units as the preference term. While the chosen error is above the "
            "reference, the chosen gradient is (1 + lambda) times the dpo one. "
            "Not tuned for video."
        },
    )

    def __post_init__(self) -> None:
        _check_number("dpop", "lam", self.lam, minimum=0.0)


@dataclass
class IpoConfig:
    """IPO baseline (squared loss towards a fixed margin)."""

    tau: float = field(
        default=0.5,
        metadata={
            "help": "Regularisation tau of IPO. The target logit margin is 1 / (2 tau), so 0.5 "
            "targets a logit of 1, a preference probability sigmoid(1) = 0.73."
        },
    )

    def __post_init__(self) -> None:
        _check_number("ipo", "tau", self.tau, minimum=0.0, strict_minimum=True)


@dataclass
class KtoConfig:
    """KTO baseline: chosen samples are desirable, rejected samples undesirable, unpaired."""

    lam_desirable: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the desirable (chosen) samples. Each batch has as many desirable "
            "as undesirable samples, so equal weights keep the two classes balanced."
        },
    )
    lam_undesirable: float = field(
        default=1.0,
        metadata={"help": "Weight of the undesirable (rejected) samples."},
    )

    def __post_init__(self) -> None:
        _check_number("kto", "lam_desirable", self.lam_desirable, minimum=0.0)
        _check_number("kto", "lam_undesirable", self.lam_undesirable, minimum=0.0)


@dataclass
class VideoDpoConfig:
    """VideoDPO baseline: Diffusion-DPO with a per-pair weight from the score margin."""

    margin_ref: float = field(
        default=0.25,
        metadata={
            "help": "Score margin r_w - r_l that gets weight 1. 0.25 is a quarter of the "
            "normalised score range. Set it near the median margin of the training pairs so that "
            "the mean weight, and with it the effective learning rate, stays near 1."
        },
    )
    power: float = field(
        default=1.0,
        metadata={"help": "Exponent of the weight ((r_w - r_l) / margin_ref) ** power. 1 is linear."},
    )
    max_weight: float = field(
        default=4.0,
        metadata={
            "help": "Upper bound on a pair's weight, so that a few pairs with extreme margins "
            "cannot dominate a batch."
        },
    )

    def __post_init__(self) -> None:
        _check_number("videodpo", "margin_ref", self.margin_ref, minimum=0.0, strict_minimum=True)
        _check_number("videodpo", "power", self.power, minimum=0.0)
        _check_number("videodpo", "max_weight", self.max_weight, minimum=0.0, strict_minimum=True)


@dataclass
class SdpoConfig:
    """Diffusion-SDPO safeguard: the loser gradient is scaled so the winner error cannot rise."""

    mu: float = field(
        default=0.0,
        metadata={
            "help": "Safety margin mu in [0, 1). The first-order decrease of the winner error is "
            "kept at least mu times that of winner-only training. 0 only forbids an increase."
        },
    )
    scope: SdpoScope = field(
        default="batch",
        metadata={
            "help": f"Where the scale is computed, one of {list(SDPO_SCOPES)}: 'batch' gives one "
            "scale from the residuals of the whole batch, 'pair' gives one per pair."
        },
    )

    def __post_init__(self) -> None:
        _check_number("sdpo", "mu", self.mu, minimum=0.0, maximum=1.0, strict_maximum=True)
        _check_choice("sdpo", "scope", self.scope, SDPO_SCOPES)


@dataclass
class LossConfig:
    """Constants of every preference loss. The method itself is chosen per call of compute_loss."""

    beta: float = field(
        default=2500.0,
        metadata={
            "help": "Inverse temperature beta of the implicit reward -beta * D. For flow-matching "
            "latents, per-sample errors are O(1) and D is expected to be O(1e-3) (an estimate), "
            "so 2500 puts the dpo logit (beta/2) * (D_w - D_l) at O(1), where the sigmoid still "
            "has gradient. It is half the default 5000 of public Diffusion-DPO code for "
            "epsilon-prediction Stable Diffusion (AIDC-AI/Diffusion-SDPO, train.py), because the "
            "velocity target has about twice the per-element variance of the noise target."
        },
    )
    ars: ArsConfig = field(default_factory=ArsConfig)
    ipr: IprConfig = field(default_factory=IprConfig)
    dpop: DpopConfig = field(default_factory=DpopConfig)
    ipo: IpoConfig = field(default_factory=IpoConfig)
    kto: KtoConfig = field(default_factory=KtoConfig)
    videodpo: VideoDpoConfig = field(default_factory=VideoDpoConfig)
    sdpo: SdpoConfig = field(default_factory=SdpoConfig)

    def __post_init__(self) -> None:
        _check_number("loss", "beta", self.beta, minimum=0.0, strict_minimum=True)
        for config_field in dataclasses.fields(self):
            expected_type = config_field.default_factory
            value = getattr(self, config_field.name)
            if dataclasses.is_dataclass(expected_type) and not isinstance(value, expected_type):
                raise ValueError(
                    f"invalid loss.{config_field.name}={value!r}: expected an instance of {expected_type.__name__}; "
                    "use LossConfig.from_dict to build the config from nested mappings"
                )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LossConfig:
        """Build a LossConfig from a nested mapping, such as the loss section of params.yaml.

        Sub-configs are nested mappings (`{"ipr": {"switch": "soft"}}`). Missing keys keep
        their defaults. Raises ValueError on an unknown key at any level, naming the key and
        listing the valid ones.
        """
        return _from_mapping(cls, d, "loss")


def _from_mapping(config_type: type, values: Any, section: str) -> Any:
    """Build the dataclass `config_type` from `values`, recursing into nested dataclass fields."""
    if not isinstance(values, Mapping):
        raise ValueError(
            f"invalid {section}: expected a mapping of keys to values, got {type(values).__name__} {values!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(config_type)}
    unknown = sorted(set(values) - set(fields), key=str)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {section}; valid keys: {sorted(fields)}")

    kwargs = {}
    for name, value in values.items():
        default_factory = fields[name].default_factory
        if dataclasses.is_dataclass(default_factory):
            kwargs[name] = _from_mapping(default_factory, value, f"{section}.{name}")
        else:
            kwargs[name] = value
    return config_type(**kwargs)
