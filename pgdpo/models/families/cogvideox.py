"""Adapter for `CogVideoXPipeline` (CogVideoX 1.0 and 1.5 text-to-video, DDIM-style v or epsilon prediction)."""

from __future__ import annotations

import math

import numpy as np
import torch

from pgdpo.models.adapter import VideoConstraints, VideoModelAdapter, to_uint8


class CogVideoXAdapter(VideoModelAdapter):
    """CogVideoX: T5 text encoder, causal 3D VAE with one scaling factor, expert-block DiT denoiser.

    Cached latents keep the (B, C, F, H, W) layout of every other family. `predict` permutes
    them to the (B, F, C, H, W) layout of the CogVideoX transformer and permutes its output back.
    """

    family = "cogvideox"
    pipeline_class = "CogVideoXPipeline"
    # Attention projections of the joint text-video attention, the usual LoRA targets for CogVideoX.
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")

    def video_constraints(self) -> VideoConstraints:
        # CogVideoXPipeline.check_inputs requires multiples of 8, and the transformer patchifies latents.
        patch = self.denoiser.config.patch_size
        spatial = self.pipe.vae_scale_factor_spatial
        return VideoConstraints(self.pipe.vae_scale_factor_temporal, math.lcm(8, spatial * patch))

    @torch.no_grad()
    def encode_videos(self, frames: np.ndarray) -> torch.Tensor:
        vae = self.pipe.vae
        # (B, F, H, W, 3) uint8 -> (B, 3, F, H, W) in [-1, 1], as the VAE was trained.
        pixels = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device, vae.dtype)
        pixels = pixels.permute(0, 4, 1, 2, 3) / 127.5 - 1.0
        latents = vae.encode(pixels).latent_dist.mode()
        # The pipeline divides by this factor before decoding, so the denoiser input is scaled too.
        return latents * vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.pipe.vae
        latents = latents.to(self.device, vae.dtype) / vae.config.scaling_factor
        video = vae.decode(latents).sample
        # (B, 3, F, H, W) in [-1, 1] -> (B, F, H, W, 3) in [0, 1].
        video = ((video.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)
        return to_uint8(video.float().cpu().numpy())

    def sample_timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        # Uniform over the discrete training timesteps, as in DDPM training.
        return torch.rand(batch_size, generator=generator)

    def noisy_latents_and_target(self, latents, noise, sigmas):
        # CogVideoXDDIMScheduler applies its SNR shift to alphas_cumprod, so add_noise and
        # get_velocity already use the noise schedule that sampling uses.
        scheduler = self.pipe.scheduler
        num_train_timesteps = scheduler.config.num_train_timesteps
        timesteps = (sigmas * num_train_timesteps).long().clamp(0, num_train_timesteps - 1).to(latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if self.objective == "v_prediction":
            return noisy, timesteps, scheduler.get_velocity(latents, noise, timesteps)
        return noisy, timesteps, noise

    def _rotary_embeddings(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Return the transformer's 3D rotary embeddings for `latents` (B, C, F, H, W), or None if it has none."""
        transformer = self.denoiser
        if not transformer.config.use_rotary_positional_embeddings:
            return None
        num_frames, height, width = latents.shape[2:]
        patch_size_t = transformer.config.patch_size_t
        if patch_size_t is not None and num_frames % patch_size_t != 0:
            raise ValueError(
                f"{num_frames} latent frames are not a multiple of the transformer's patch_size_t={patch_size_t}; "
                f"set base.video.num_frames so that (num_frames - 1) / {self.pipe.vae_scale_factor_temporal} + 1 "
                f"is a multiple of {patch_size_t} (for example 85 for CogVideoX 1.5)"
            )
        # The pipeline's own helper, so that training uses the positions that sampling uses.
        scale = self.pipe.vae_scale_factor_spatial
        return self.pipe._prepare_rotary_positional_embeddings(height * scale, width * scale, num_frames, latents.device)

    def predict(self, noisy, timesteps, prompt_embeds):
        prediction = self.denoiser(
            hidden_states=noisy.permute(0, 2, 1, 3, 4),
            encoder_hidden_states=prompt_embeds,
            timestep=timesteps,
            image_rotary_emb=self._rotary_embeddings(noisy),
            return_dict=False,
        )[0]
        return prediction.permute(0, 2, 1, 3, 4)
