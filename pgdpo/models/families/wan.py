"""Adapter for `WanPipeline` (Wan 2.1 and 2.2 text-to-video, flow matching)."""

from __future__ import annotations

import math

import numpy as np
import torch

from pgdpo.models.adapter import VideoConstraints, VideoModelAdapter, flow_matching_inputs, shifted_logit_normal, to_uint8
from pgdpo.models.families.wan_attention import use_rotary_processor
from pgdpo.models.families.wan_vae import use_fast_vae_norm


class WanAdapter(VideoModelAdapter):
    """Wan: UMT5 text encoder, causal 3D VAE with per-channel latent statistics, DiT denoiser."""

    family = "wan"
    pipeline_class = "WanPipeline"
    # Attention projections of self- and cross-attention, the usual LoRA targets for Wan.
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, pipe, spec, device, dtype):
        super().__init__(pipe, spec, device, dtype)
        use_rotary_processor(self.denoiser)
        if getattr(pipe, "vae", None) is not None:
            use_fast_vae_norm(pipe.vae)

    def video_constraints(self) -> VideoConstraints:
        # WanPipeline.check_inputs requires multiples of 16, and the transformer patchifies latents.
        patch = self.denoiser.config.patch_size[1]
        spatial = self.pipe.vae_scale_factor_spatial
        return VideoConstraints(self.pipe.vae_scale_factor_temporal, math.lcm(16, spatial * patch))

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.pipe.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
        std = torch.tensor(config.latents_std, device=like.device, dtype=like.dtype).view(shape)
        return mean, std

    @torch.no_grad()
    def encode_videos(self, frames: np.ndarray) -> torch.Tensor:
        vae = self.pipe.vae
        # (B, F, H, W, 3) uint8 -> (B, 3, F, H, W) in [-1, 1], as the VAE was trained.
        pixels = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device, vae.dtype)
        pixels = pixels.permute(0, 4, 1, 2, 3) / 127.5 - 1.0
        latents = vae.encode(pixels).latent_dist.mode()
        mean, std = self._latent_stats(latents)
        return (latents - mean) / std

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.pipe.vae
        latents = latents.to(self.device, vae.dtype)
        mean, std = self._latent_stats(latents)
        video = vae.decode(latents * std + mean).sample
        # (B, 3, F, H, W) in [-1, 1] -> (B, F, H, W, 3) in [0, 1].
        video = ((video.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)
        return to_uint8(video.float().cpu().numpy())

    def sample_timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return shifted_logit_normal(batch_size, generator, float(self.pipe.scheduler.config.get("shift", 1.0)))

    def noisy_latents_and_target(self, latents, noise, sigmas):
        return flow_matching_inputs(latents, noise, sigmas, self.pipe.scheduler.config.num_train_timesteps)

    def predict(self, noisy, timesteps, prompt_embeds):
        return self.denoiser(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=prompt_embeds,
            return_dict=False,
        )[0]
