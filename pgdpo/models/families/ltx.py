"""Adapter for `LTXPipeline` (LTX-Video text-to-video, flow matching)."""

from __future__ import annotations

import inspect
import logging
import math

import numpy as np
import torch
from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

from pgdpo.models.adapter import VideoConstraints, VideoModelAdapter, flow_matching_inputs, shifted_logit_normal, to_uint8

logger = logging.getLogger(__name__)


def pack_prompt(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Append the attention mask (B, L) to the embeddings (B, L, D) as one extra row: (B, L + 1, D).

    Row L contains the mask in its first L entries and zeros after them, so the cached prompt
    stays one (N, L', D) tensor like every other family's.
    """
    batch, length, dim = embeds.shape
    if length > dim:
        raise ValueError(
            f"cannot pack a {length}-token attention mask into {dim}-wide prompt embeddings; "
            f"set base.video.max_sequence_length to at most {dim}"
        )
    mask_row = embeds.new_zeros(batch, 1, dim)
    mask_row[:, 0, :length] = mask.to(embeds.dtype)
    return torch.cat([embeds, mask_row], dim=1)


def unpack_prompt(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split what `pack_prompt` returns back into embeddings (B, L, D) and mask (B, L)."""
    length = packed.shape[1] - 1
    return packed[:, :length], packed[:, length, :length]


class LTXAdapter(VideoModelAdapter):
    """LTX-Video: T5 text encoder, 32x32x8 compressing VAE with per-channel statistics, DiT denoiser.

    `encode_prompts` returns the T5 embeddings with their attention mask packed as one extra
    row (see `pack_prompt`), because the transformer masks out padding tokens. Cached latents
    keep the (B, C, F, H, W) layout. `predict` packs them into the token sequence the
    transformer takes and unpacks its output, both with the pipeline's own helpers.
    """

    family = "ltx"
    pipeline_class = "LTXPipeline"
    # Attention projections of self- and cross-attention, the usual LoRA targets for LTX-Video.
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")

    def video_constraints(self) -> VideoConstraints:
        # LTXPipeline.check_inputs requires multiples of 32, and the transformer patchifies latents.
        patch = self.denoiser.config.patch_size
        spatial = self.pipe.vae_spatial_compression_ratio
        return VideoConstraints(self.pipe.vae_temporal_compression_ratio, math.lcm(32, spatial * patch))

    def __init__(self, pipe, spec, device, dtype):
        super().__init__(pipe, spec, device, dtype)
        default = inspect.signature(type(pipe).__call__).parameters["frame_rate"].default
        if spec.fps != default:
            logger.warning(
                "LTX-Video trains and samples with frame_rate=%d from base.video.fps, while LTXPipeline "
                "defaults to %d; set base.video.fps: %d to use the default rotary positions",
                spec.fps, default, default,
            )

    @property
    def frame_rate(self) -> float:
        """Frame rate in the transformer's rotary position scale: `spec.fps`, which `generate` also passes."""
        return float(self.spec.fps)

    def sampling_kwargs(self) -> dict:
        return {"frame_rate": self.spec.fps}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        embeds, mask, _, _ = self.pipe.encode_prompt(
            prompt=prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=self.spec.max_sequence_length,
            device=self.device,
        )
        return pack_prompt(embeds, mask)

    @torch.no_grad()
    def encode_videos(self, frames: np.ndarray) -> torch.Tensor:
        vae = self.pipe.vae
        # (B, F, H, W, 3) uint8 -> (B, 3, F, H, W) in [-1, 1], as the VAE was trained.
        pixels = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device, vae.dtype)
        pixels = pixels.permute(0, 4, 1, 2, 3) / 127.5 - 1.0
        latents = vae.encode(pixels).latent_dist.mode()
        return self.pipe._normalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.pipe.vae
        latents = latents.to(self.device, vae.dtype)
        latents = self.pipe._denormalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        # A timestep-conditioned decoder (LTX-Video 0.9.1 and later) gets the pipeline's default
        # decode_timestep of 0, which also adds no noise.
        timestep = None
        if vae.config.timestep_conditioning:
            timestep = torch.zeros(latents.shape[0], device=self.device, dtype=latents.dtype)
        video = vae.decode(latents, timestep, return_dict=False)[0]
        # (B, 3, F, H, W) in [-1, 1] -> (B, F, H, W, 3) in [0, 1].
        video = ((video.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)
        return to_uint8(video.float().cpu().numpy())

    def _shift(self) -> float:
        """Return the timestep shift that sampling applies at this video size."""
        config = self.pipe.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return float(config.get("shift", 1.0))
        # Same sequence length and shift as LTXPipeline.__call__: one token per latent voxel.
        latent_frames = (self.spec.num_frames - 1) // self.pipe.vae_temporal_compression_ratio + 1
        latent_height = self.spec.height // self.pipe.vae_spatial_compression_ratio
        latent_width = self.spec.width // self.pipe.vae_spatial_compression_ratio
        mu = calculate_shift(
            latent_frames * latent_height * latent_width,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        # The scheduler's time shift exp(mu) / (exp(mu) + 1/s - 1) equals the shift formula
        # below with shift = exp(mu); its linear variant uses mu itself.
        return math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu

    def sample_timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return shifted_logit_normal(batch_size, generator, self._shift())

    def noisy_latents_and_target(self, latents, noise, sigmas):
        return flow_matching_inputs(latents, noise, sigmas, self.pipe.scheduler.config.num_train_timesteps)

    def predict(self, noisy, timesteps, prompt_embeds):
        embeds, mask = unpack_prompt(prompt_embeds)
        num_frames, height, width = noisy.shape[2:]
        patch_size = self.pipe.transformer_spatial_patch_size
        patch_size_t = self.pipe.transformer_temporal_patch_size
        spatial_ratio = self.pipe.vae_spatial_compression_ratio
        rope_interpolation_scale = (
            self.pipe.vae_temporal_compression_ratio / self.frame_rate,
            spatial_ratio,
            spatial_ratio,
        )
        # Latent sizes go to the transformer as LTXPipeline.__call__ passes them.
        prediction = self.denoiser(
            hidden_states=self.pipe._pack_latents(noisy, patch_size, patch_size_t),
            encoder_hidden_states=embeds,
            timestep=timesteps,
            encoder_attention_mask=mask,
            num_frames=num_frames,
            height=height,
            width=width,
            rope_interpolation_scale=rope_interpolation_scale,
            return_dict=False,
        )[0]
        return self.pipe._unpack_latents(
            prediction, num_frames // patch_size_t, height // patch_size, width // patch_size, patch_size, patch_size_t
        )
