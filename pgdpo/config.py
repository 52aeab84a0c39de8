"""The `params.yaml` schema: one pydantic model per stage section, validated before any work.

Unknown keys, wrong types and out-of-range values raise `ParamsError` with the dotted key,
the value and the allowed range, so a stage fails before it computes anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pgdpo.losses import METHODS, LossConfig

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """Raised when params.yaml is missing, unreadable or fails validation."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RuntimeParams(Section):
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:N or auto")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weight dtype of the base model")
    autocast: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="mixed-precision dtype for training forward passes (CUDA only)"
    )
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 keeps torch's default")


class WorldParams(Section):
    num_frames: int = Field(5, ge=2, description="frames per clip (the shapes VAE needs 1 + 2k)")
    height: int = Field(32, ge=16, multiple_of=16, description="clip height in pixels (WanPipeline needs multiples of 16)")
    width: int = Field(32, ge=16, multiple_of=16, description="clip width in pixels")
    fps: int = Field(8, ge=1, description="frame rate written into MP4 files")


class PromptsParams(Section):
    num_eval_combos: int = Field(3, ge=1, description="(colour, shape) combinations held out for evaluation")
    seed: int = 0


class BaseParams(Section):
    model: str = Field("shapes", description='"shapes" trains the built-in base; otherwise a hub id or local path')
    revision: str | None = None
    variant: str | None = None
    vae_steps: int = Field(300, ge=1)
    vae_lr: float = Field(2e-3, gt=0)
    transformer_steps: int = Field(2000, ge=1)
    transformer_lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(8, ge=1)
    clips_per_prompt: int = Field(24, ge=1)
    seed: int = 0


class GenerateParams(Section):
    num_candidates: int = Field(4, ge=2, description="candidate videos per train prompt")
    num_inference_steps: int = Field(20, ge=1)
    guidance_scale: float = Field(4.0, ge=0)
    batch_size: int = Field(64, ge=1)
    seed: int = 1000


class ScoreParams(Section):
    weights: dict[str, float] = Field(
        default_factory=lambda: {"oracle_alignment": 1.0, "temporal_flickering": 0.25},
        description="scorer name -> weight of the total reward",
    )

    @field_validator("weights")
    @classmethod
    def _positive_weights(cls, weights: dict[str, float]) -> dict[str, float]:
        if not weights:
            raise ValueError("needs at least one scorer")
        negative = {name: w for name, w in weights.items() if w < 0}
        if negative:
            raise ValueError(f"weights must be >= 0, got {negative}")
        return weights


class LabelParams(Section):
    strategy: Literal["best_vs_worst", "all_pairs"] = "best_vs_worst"
    min_margin: float = Field(0.05, ge=0, description="pairs whose total-score gap is below this are dropped")
    num_probe_pairs: int = Field(8, ge=1, description="pairs held out from training for the likelihood probe")
    seed: int = 0


class LoraParams(Section):
    rank: int = Field(8, ge=1)
    alpha: float = Field(8.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] | None = Field(None, description="module names; null uses the family default")


class TrainParams(Section):
    method: str = Field("pgdpo", description=f"preference loss, one of {list(METHODS)}")
    steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1, description="pairs per step")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    probe_every: int = Field(10, ge=1, description="steps between held-out likelihood probes")
    log_every: int = Field(5, ge=1)
    checkpoint_every: int = Field(50, ge=0, description="steps between resumable checkpoints; 0 disables them")
    seed: int = 0
    lora: LoraParams = Field(default_factory=LoraParams)
    loss: dict[str, Any] = Field(default_factory=dict, description="LossConfig fields: beta, ars, ipr, ...")

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
        return method

    @field_validator("loss")
    @classmethod
    def _valid_loss(cls, loss: dict[str, Any]) -> dict[str, Any]:
        LossConfig.from_dict(loss)
        return loss

    def loss_config(self) -> LossConfig:
        return LossConfig.from_dict(self.loss)


class EvaluateParams(Section):
    num_videos_per_prompt: int = Field(5, ge=1, description="VBench standard mode samples 5 videos per prompt")
    num_inference_steps: int = Field(20, ge=1)
    guidance_scale: float = Field(4.0, ge=0)
    batch_size: int = Field(64, ge=1)
    seed: int = 2000
    sheet_prompts: int = Field(6, ge=1, description="eval prompts shown in the contact sheet")


class TrackingParams(Section):
    experiment: str = "pgdpo"
    required: bool = Field(True, description="fail when MLflow is unreachable; false warns and continues")


class Params(Section):
    seed: int = 0
    runtime: RuntimeParams = Field(default_factory=RuntimeParams)
    world: WorldParams = Field(default_factory=WorldParams)
    prompts: PromptsParams = Field(default_factory=PromptsParams)
    base: BaseParams = Field(default_factory=BaseParams)
    generate: GenerateParams = Field(default_factory=GenerateParams)
    score: ScoreParams = Field(default_factory=ScoreParams)
    label: LabelParams = Field(default_factory=LabelParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and validate params.yaml; raise ParamsError naming each invalid key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {path} not found; run from the project root or pass its path")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ParamsError(f"params file {path} is not valid YAML: {error}") from error
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(_format_errors(path, error)) from None
    except ValueError as error:
        raise ParamsError(f"{path}: {error}") from None


def _format_errors(path: Path, error: ValidationError) -> str:
    lines = [f"{path}: {error.error_count()} invalid value(s)"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        value = item.get("input")
        lines.append(f"  {key} = {value!r}: {item['msg']}")
    return "\n".join(lines)
