"""One interface over text-to-video diffusers pipelines.

`generate`, `label`, `train` and `evaluate` only talk to a `VideoModelAdapter`, so the shapes
world and a released checkpoint run through the same code. A family adapter defines how to
encode prompts and videos, what the denoiser predicts, and how to call it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from pgdpo.runtime import generators

logger = logging.getLogger(__name__)

Objective = Literal["flow", "epsilon", "v_prediction"]

# Written next to a pipeline's model_index.json by the `base` stage. It contains the video size the
# model was trained for, so later stages need no copy of it in params.
SIDECAR = "pgdpo.json"


@dataclass
class VideoSpec:
    """Video size and sampling defaults of a model."""

    num_frames: int
    height: int
    width: int
    fps: int = 8
    max_sequence_length: int = 512


@dataclass(frozen=True)
class VideoConstraints:
    """Video sizes a pipeline accepts: `num_frames` = 1 + k * frame_step, and height and width
    multiples of `size_multiple` pixels."""

    frame_step: int
    size_multiple: int

    def violations(self, spec: VideoSpec) -> dict[str, str]:
        """Return {field: what is wrong and the nearest valid value} for each field of `spec` that breaks a rule."""
        problems = {}
        if spec.num_frames < 1 or (spec.num_frames - 1) % self.frame_step:
            valid = 1 + max(round((spec.num_frames - 1) / self.frame_step), 0) * self.frame_step
            problems["num_frames"] = (
                f"{spec.num_frames} is not 1 + k * {self.frame_step} (the VAE's temporal compression); "
                f"for example use {valid}"
            )
        for name in ("height", "width"):
            value = getattr(spec, name)
            if value < self.size_multiple or value % self.size_multiple:
                valid = max(round(value / self.size_multiple), 1) * self.size_multiple
                problems[name] = f"{value} is not a positive multiple of {self.size_multiple}; for example use {valid}"
        return problems


class VideoModelAdapter:
    """Base class: a diffusers pipeline plus the family-specific pieces training needs.

    Subclasses set `pipeline_class`, `objective_default` and `lora_targets`, and override the
    hooks whose behaviour differs between families.
    """

    family: ClassVar[str]
    pipeline_class: ClassVar[str]
    lora_targets: ClassVar[tuple[str, ...]]
    # Keyword of the pipeline's `save_lora_weights` for the denoiser's layers.
    lora_layers_kwarg: ClassVar[str] = "transformer_lora_layers"

    def __init__(self, pipe, spec: VideoSpec, device: torch.device, dtype: torch.dtype):
        self.pipe = pipe
        self.spec = spec
        self.device = device
        self.dtype = dtype

    # ----- components ---------------------------------------------------------------

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network that predicts noise or velocity (the transformer or UNet)."""
        return self.pipe.transformer

    @property
    def objective(self) -> Objective:
        """Training target, read from the scheduler config rather than a user flag."""
        scheduler = self.pipe.scheduler
        prediction = scheduler.config.get("prediction_type")
        if type(scheduler).__name__.startswith("FlowMatch") or prediction == "flow_prediction":
            return "flow"
        if prediction == "v_prediction":
            return "v_prediction"
        if prediction in (None, "epsilon"):
            return "epsilon"
        raise ValueError(
            f"scheduler {type(scheduler).__name__} has prediction_type={prediction!r}; "
            "supported: flow matching, 'epsilon' and 'v_prediction'"
        )

    def video_constraints(self) -> VideoConstraints:
        """Frame-count step and pixel-size multiple of this pipeline (VAE compression times patch size)."""
        raise NotImplementedError

    # ----- encoding -----------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Return prompt embeddings (B, L, D) as the pipeline computes them, without guidance."""
        embeds, _ = self.pipe.encode_prompt(
            prompt=prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=self.spec.max_sequence_length,
            device=self.device,
        )
        return embeds

    @torch.no_grad()
    def encode_videos(self, frames: np.ndarray) -> torch.Tensor:
        """Encode uint8 clips (B, F, H, W, 3) to normalised latents (B, C, F', H', W')."""
        raise NotImplementedError

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """Decode normalised latents back to uint8 clips (B, F, H, W, 3)."""
        raise NotImplementedError

    # ----- training objective -------------------------------------------------------

    def sample_timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Sample training noise levels in [0, 1] (sigma for flow models, t/T otherwise)."""
        raise NotImplementedError

    def noisy_latents_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (x_t, model timesteps, regression target) for clean latents and noise levels."""
        raise NotImplementedError

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """Run the denoiser once and return its prediction with the shape of `noisy`."""
        raise NotImplementedError

    # ----- sampling -----------------------------------------------------------------

    def sampling_kwargs(self) -> dict:
        """Return family-specific `__call__` arguments that `generate` passes on (none by default)."""
        return {}

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        num_inference_steps: int,
        guidance_scale: float,
        batch_size: int,
        negative_prompt: str = "",
        desc: str = "sampling",
    ) -> np.ndarray:
        """Sample one clip per (prompt, seed) through the pipeline's own `__call__`.

        Each clip gets its own generator, so a clip depends only on its prompt and seed and
        not on which other clips share its batch.

        Returns:
            uint8 array (N, F, H, W, 3).
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt")
        clips = []
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
            batch_prompts = prompts[start : start + batch_size]
            batch_seeds = seeds[start : start + batch_size]
            output = self.pipe(
                prompt=batch_prompts,
                negative_prompt=[negative_prompt] * len(batch_prompts),
                num_frames=self.spec.num_frames,
                height=self.spec.height,
                width=self.spec.width,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators(batch_seeds),
                output_type="np",
                max_sequence_length=self.spec.max_sequence_length,
                **self.sampling_kwargs(),
            )
            clips.append(to_uint8(np.asarray(output.frames)))
        return np.concatenate(clips, axis=0)


def shifted_logit_normal(batch_size: int, generator: torch.Generator, shift: float) -> torch.Tensor:
    """Sample flow-matching noise levels: logit-normal, then the sampler's timestep shift.

    Training then draws the noise levels that sampling visits most.
    """
    u = torch.sigmoid(torch.randn(batch_size, generator=generator))
    return shift * u / (1 + (shift - 1) * u)


def flow_matching_inputs(
    latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, num_train_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (x_t, timesteps, target) of rectified flow for noise levels `sigmas` (B,).

    x_t = (1 - sigma) x0 + sigma e, the velocity target is e - x0, and the denoiser takes sigma
    scaled to the scheduler's training timesteps.
    """
    sigma = sigmas.view(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)
    noisy = (1 - sigma) * latents + sigma * noise
    timesteps = sigmas * num_train_timesteps
    return noisy, timesteps.to(latents.device), noise - latents


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Convert float frames in [0, 1] to uint8 with rounding."""
    return np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)


def read_video_spec(model_dir: Path | None, overrides: dict | None = None) -> VideoSpec:
    """Read the sidecar `pgdpo.json` of a local pipeline folder, then apply non-null `overrides`."""
    values: dict = {}
    sidecar = Path(model_dir) / SIDECAR if model_dir is not None else None
    if sidecar is not None and sidecar.is_file():
        values.update(json.loads(sidecar.read_text()))
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    missing = [name for name in ("num_frames", "height", "width") if name not in values]
    if missing:
        raise ValueError(
            f"video size {missing} unknown for model {model_dir}: set them under base.video in params.yaml"
        )
    return VideoSpec(**{key: values[key] for key in VideoSpec.__dataclass_fields__ if key in values})


def write_video_spec(model_dir: Path, spec: VideoSpec) -> None:
    """Write the sidecar `pgdpo.json` that `read_video_spec` reads."""
    (Path(model_dir) / SIDECAR).write_text(json.dumps(spec.__dict__, indent=2, sort_keys=True) + "\n")
