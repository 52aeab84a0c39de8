"""The `params.yaml` schema: one pydantic model per stage section, validated before any work.

Unknown keys, wrong types and out-of-range values raise `ParamsError` with the dotted key,
the value and the allowed range, so a stage fails before it computes anything.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pgdpo.losses import METHODS, LossConfig

DEFAULT_PARAMS = Path("params.yaml")
# Device names that `pgdpo.runtime.resolve_device` accepts.
DEVICE_PATTERN = r"^(cpu|auto|cuda(:\d+)?)$"

# Modes of torch.compile that `train.compile_mode` and `runtime.compile_sampling_mode` accept.
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]

# Forward forms of LoRA linear layers that `train.lora.forward` accepts (pgdpo.training.lora_forward).
LoraForward = Literal["auto", "merged", "fused", "peft"]


class ParamsError(ValueError):
    """Raised when params.yaml is missing, unreadable or fails validation."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RuntimeParams(Section):
    device: str = Field("cpu", pattern=DEVICE_PATTERN, description="torch device: cpu, cuda, cuda:N or auto")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weight dtype of the base model")
    autocast: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="mixed-precision dtype for training forward passes (CUDA only)"
    )
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 keeps torch's default")
    vae_slicing: bool = Field(False, description="VAE encodes and decodes one clip of a batch at a time")
    vae_tiling: bool = Field(False, description="VAE works on overlapping spatial tiles (where the VAE class supports it)")
    cpu_offload: bool = Field(False, description="sampling stages move each component to the GPU only while it runs (CUDA only)")
    compile_sampling: bool = Field(
        False, description="torch.compile the denoiser in the sampling stages (generate, evaluate_base, evaluate)"
    )
    compile_sampling_mode: CompileMode = Field("default", description="torch.compile mode when runtime.compile_sampling is true")


class WorldParams(Section):
    num_frames: int = Field(5, ge=2, description="frames per clip (the shapes VAE needs 1 + 2k)")
    height: int = Field(32, ge=16, multiple_of=16, description="clip height in pixels (WanPipeline needs multiples of 16)")
    width: int = Field(32, ge=16, multiple_of=16, description="clip width in pixels")
    fps: int = Field(8, ge=1, description="frame rate written into MP4 files")


class PromptsParams(Section):
    num_eval_combos: int = Field(3, ge=1, description="(colour, shape) combinations held out for evaluation")
    seed: int = 0
    train_file: str | None = Field(
        None,
        description="train prompt file (one prompt per line, or VBench_full_info.json); null uses the "
        "shapes-world train prompts. Keep it under data/prompt_files/ so that DVC reruns on edits",
    )

    @field_validator("num_eval_combos")
    @classmethod
    def _leaves_train_coverage(cls, value: int) -> int:
        # Eval prompts never overlap train prompts, and train must still show every colour and shape.
        from pgdpo.world.grammar import max_eval_combos

        if value > max_eval_combos():
            raise ValueError(
                f"at most {max_eval_combos()} combinations can be held out so that every colour and "
                "shape stays in the train prompts"
            )
        return value


class VideoParams(Section):
    """Video size of a hub or local base model; null keeps the value of the folder's pgdpo.json."""

    num_frames: int | None = Field(None, ge=1, description="frames per clip; each family needs 1 + k * its temporal compression")
    height: int | None = Field(None, ge=8, description="clip height in pixels")
    width: int | None = Field(None, ge=8, description="clip width in pixels")
    fps: int | None = Field(None, ge=1, description="frame rate written into MP4 files")
    max_sequence_length: int | None = Field(None, ge=1, description="prompt length in tokens")


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
    video: VideoParams = Field(default_factory=VideoParams, description="video size when model is not shapes")


class ShardedSection(Section):
    """Section of a stage that can cut its work into shards and run them on a Dask cluster."""

    shards: int = Field(1, ge=1, description="pieces the work is cut into; >1 runs them on a Dask cluster")
    workers: int = Field(2, ge=1, description="worker processes of the local Dask cluster when shards > 1")
    dask_address: str | None = Field(None, description="scheduler address of a running Dask cluster; null starts a local one")


class GenerateParams(ShardedSection):
    num_candidates: int = Field(4, ge=2, description="candidate videos per train prompt")
    num_inference_steps: int = Field(20, ge=1)
    guidance_scale: float = Field(4.0, ge=0)
    batch_size: int = Field(64, ge=1)
    seed: int = 1000


def _check_scorer_names(names: list[str]) -> None:
    """Raise ValueError naming each of `names` that is not a registered scorer."""
    from pgdpo.scoring.registry import available_scorers

    unknown = [name for name in names if name not in available_scorers()]
    if unknown:
        raise ValueError(f"unknown scorer names {unknown}. Use names from {available_scorers()}")


class ScoreParams(ShardedSection):
    weights: dict[str, float] = Field(
        default_factory=lambda: {"oracle_alignment": 1.0, "temporal_flickering": 0.25},
        description="scorer name -> weight of the total reward",
    )

    @field_validator("weights")
    @classmethod
    def _positive_weights(cls, weights: dict[str, float]) -> dict[str, float]:
        if not weights:
            raise ValueError("needs at least one scorer")
        _check_scorer_names(list(weights))
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
    forward: LoraForward = Field(
        "auto", description="how LoRA linear layers compute: auto (merged up to 256x256 weights, else fused), merged, fused or peft"
    )


class TrainParams(Section):
    method: str = Field("pgdpo", description=f"preference loss, one of {list(METHODS)}")
    steps: int = Field(150, ge=1)
    batch_size: int = Field(8, ge=1, description="pairs per step")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    probe_every: int = Field(20, ge=1, description="steps between held-out likelihood probes")
    log_every: int = Field(5, ge=1)
    checkpoint_every: int = Field(50, ge=0, description="steps between resumable checkpoints; 0 disables them")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer step; batch_size stays the pairs per step")
    gradient_checkpointing: bool = Field(False, description="recompute denoiser activations in backward to save memory")
    compile: bool = Field(False, description="torch.compile the denoiser; pays off in long runs, costs minutes to compile")
    compile_mode: CompileMode = Field("default", description="torch.compile mode when train.compile is true")
    offload_frozen: bool = Field(True, description="release the text encoders and VAE: training reads cached latents")
    num_processes: int = Field(1, ge=1, description="data-parallel processes; >1 relaunches train with accelerate launch")
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

    @model_validator(mode="after")
    def _batch_splits(self) -> TrainParams:
        parts = self.grad_accum_steps * self.num_processes
        if self.batch_size % parts:
            raise ValueError(
                f"train.batch_size={self.batch_size} must be a multiple of train.grad_accum_steps * "
                f"train.num_processes = {parts}, so that every micro-batch has the same size"
            )
        return self

    def loss_config(self) -> LossConfig:
        return LossConfig.from_dict(self.loss)


class EvaluateParams(ShardedSection):
    """Sampling and scoring of the eval prompts. With shards > 1, both run sharded on Dask."""

    num_videos_per_prompt: int = Field(5, ge=1, description="VBench standard mode samples 5 videos per prompt")
    num_inference_steps: int = Field(20, ge=1)
    guidance_scale: float = Field(4.0, ge=0)
    batch_size: int = Field(64, ge=1)
    seed: int = 2000
    sheet_prompts: int = Field(6, ge=1, description="eval prompts shown in the contact sheet")
    prompt_suite: str | None = Field(
        None,
        description="eval prompt file: plain text (one prompt per line, as VBench's all_dimension.txt and "
        "prompts_per_dimension/*.txt) or VBench_full_info.json; null uses the shapes-world eval prompts",
    )
    suite_dimensions: list[str] | None = Field(
        None, description="with VBench_full_info.json, keep the prompts tagged with any of these VBench dimensions"
    )


class ClipParams(Section):
    """open_clip weights of the CLIP scorers (clip_score, background_consistency, appearance_style)."""

    model: str = Field(
        "local-dir:data/reward_model",
        description="open_clip model name (e.g. ViT-B-32) or 'local-dir:FOLDER' with open_clip_config.json and weights",
    )
    pretrained: str | None = Field(
        None, description="open_clip pretrained tag (e.g. openai) or a local checkpoint file; ignored for local-dir:"
    )
    cache_dir: str | None = Field(None, description="open_clip download cache; with HF_HUB_OFFLINE=1 nothing downloads")
    device: str = Field("cpu", pattern=DEVICE_PATTERN, description="torch device of the CLIP model: cpu, cuda, cuda:N or auto")


class AestheticParams(ClipParams):
    """LAION's linear aesthetic head and the CLIP it was trained on, for aesthetic_quality."""

    model: str = Field("ViT-L-14", description="CLIP of the head; LAION's head needs ViT-L-14")
    pretrained: str | None = Field("openai", description="open_clip pretrained tag or local checkpoint file")
    head: str | None = Field(None, description="local file of the head (sa_0_4_vit_l_14_linear.pth); null: unavailable")


class ScoringParams(Section):
    dimensions: list[str] = Field(
        default_factory=lambda: [
            "oracle_color", "oracle_shape", "oracle_direction", "oracle_alignment",
            "temporal_flickering", "clip_score", "background_consistency",
        ],
        description="scorers reported per clip by score, evaluate_base and evaluate, besides the reward total",
    )
    quality_weight: float = Field(4.0, ge=0, description="weight of the quality group in omni_total (VBench: 4)")
    semantic_weight: float = Field(1.0, ge=0, description="weight of the semantic group in omni_total (VBench: 1)")
    clip: ClipParams = Field(default_factory=ClipParams)
    aesthetic: AestheticParams = Field(default_factory=AestheticParams)

    @field_validator("dimensions")
    @classmethod
    def _unique_dimensions(cls, dimensions: list[str]) -> list[str]:
        if not dimensions:
            raise ValueError("needs at least one scorer name")
        _check_scorer_names(dimensions)
        duplicates = sorted({name for name in dimensions if dimensions.count(name) > 1})
        if duplicates:
            raise ValueError(f"lists {duplicates} more than once")
        return dimensions

    @model_validator(mode="after")
    def _positive_group_weights(self) -> ScoringParams:
        if self.quality_weight + self.semantic_weight <= 0:
            raise ValueError("scoring.quality_weight + scoring.semantic_weight must be > 0")
        return self


class RewardModelParams(Section):
    steps: int = Field(300, ge=1, description="contrastive training steps of the tiny shapes-world CLIP")
    batch_size: int = Field(12, ge=2, description="frames per step, at most one per (colour, shape) pair")
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(20, ge=0)
    clips_per_prompt: int = Field(8, ge=1, description="rendered clips per train prompt")
    eval_clips_per_prompt: int = Field(4, ge=1, description="rendered clips per eval prompt for retrieval accuracy")
    seed: int = 0


class TrackingParams(Section):
    experiment: str = Field("pgdpo", min_length=1, description="MLflow experiment of the pipeline's runs")
    required: bool = Field(True, description="fail when MLflow is unreachable; false warns and continues")
    registered_model: str | None = Field(
        "pgdpo-lora", description="MLflow registry name of the trained LoRA as a pyfunc model; null skips logging it"
    )
    max_logged_clips: int = Field(8, ge=0, description="eval clips per model logged to MLflow as MP4 plus PNG poster")


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
    scoring: ScoringParams = Field(default_factory=ScoringParams)
    reward_model: RewardModelParams = Field(default_factory=RewardModelParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)

    @model_validator(mode="after")
    def _shapes_frame_count(self) -> Params:
        # The shapes-world VAE compresses time by 2, so it decodes 1 + 2k frames.
        frames = self.world.num_frames
        if self.base.model == "shapes" and (frames - 1) % 2:
            raise ValueError(
                f"world.num_frames = {frames} is not 1 + 2k, which the shapes-world VAE needs; use {frames + 1}"
            )
        return self


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that raises on a key given twice in one mapping, as DVC does."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}; keep one of its entries", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and validate params.yaml; raise ParamsError naming each invalid key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {path} not found; run from the project root or pass its path")
    try:
        loader = _UniqueKeyLoader(path.read_text())
        try:
            raw = loader.get_single_data() or {}
        finally:
            loader.dispose()
    except yaml.YAMLError as error:
        raise ParamsError(f"params file {path} is not valid YAML: {error}") from error
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(_format_errors(path, error)) from None
    except ValueError as error:
        raise ParamsError(f"{path}: {error}") from None


def _known_keys(location: tuple) -> list[str]:
    """Return the keys allowed next to the last part of `location`, or [] if that is not a section."""
    model: type[BaseModel] = Params
    for part in location[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _format_errors(path: Path, error: ValidationError) -> str:
    lines = [f"{path}: {error.error_count()} invalid value(s)"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        value = item.get("input")
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(item["loc"][-1]), _known_keys(item["loc"]), n=1)
            if close:
                message += f"; did you mean {close[0]!r}?"
        # A check across keys reports a whole section (or the whole file), whose message names the
        # keys, and an unknown section needs only its name, so neither prints the section's values.
        if isinstance(value, dict) and not item["type"].startswith(("dict", "model")):
            lines.append(f"  {key or 'params'}: {message}")
        else:
            lines.append(f"  {key} = {value!r}: {message}")
    return "\n".join(lines)
