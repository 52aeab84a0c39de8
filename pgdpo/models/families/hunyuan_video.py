"""Adapter for `HunyuanVideoPipeline` (HunyuanVideo text-to-video, flow matching, guidance-distilled)."""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch

from pgdpo.models.adapter import VideoConstraints, VideoModelAdapter, flow_matching_inputs, shifted_logit_normal, to_uint8


def pack_prompt(embeds: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """Append the attention mask (B, L) and the pooled CLIP embedding (B, P) to the Llama embeddings (B, L, D).

    Returns (B, L + 2, D): row L contains the mask in its first L entries, row L + 1 the pooled
    embedding in its first P entries, and zeros fill the rest. The cached prompt thereby
    stays one (N, L', D) tensor like every other family's.
    """
    batch, length, dim = embeds.shape
    pooled_dim = pooled.shape[-1]
    if length > dim or pooled_dim > dim:
        raise ValueError(
            f"cannot pack a {length}-token attention mask and a {pooled_dim}-wide pooled embedding into "
            f"{dim}-wide prompt embeddings; set base.video.max_sequence_length to at most {dim}"
        )
    extra = embeds.new_zeros(batch, 2, dim)
    extra[:, 0, :length] = mask.to(embeds.dtype)
    extra[:, 1, :pooled_dim] = pooled.to(embeds.dtype)
    return torch.cat([embeds, extra], dim=1)


def unpack_prompt(packed: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split what `pack_prompt` returns back into embeddings (B, L, D), mask (B, L) and pooled (B, P)."""
    length = packed.shape[1] - 2
    return packed[:, :length], packed[:, length, :length], packed[:, length + 1, :pooled_dim]


class HunyuanVideoAdapter(VideoModelAdapter):
    """HunyuanVideo: Llama and CLIP text encoders, causal 3D VAE with one scaling factor, dual-stream DiT.

    The transformer takes three text inputs: the Llama hidden states, their attention mask and
    the pooled CLIP embedding. `encode_prompts` packs all three into one tensor (see
    `pack_prompt`) and `predict` unpacks it, so caching and training handle this family like
    any other.
    """

    family = "hunyuan_video"
    pipeline_class = "HunyuanVideoPipeline"
    # Attention projections of the text token refiner, of the video stream of the dual-stream
    # blocks and of the single-stream blocks. The text stream's add_*_proj layers stay frozen.
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")

    def video_constraints(self) -> VideoConstraints:
        # HunyuanVideoPipeline.check_inputs requires multiples of 16, and the transformer patchifies latents.
        patch = self.denoiser.config.patch_size
        spatial = self.pipe.vae_scale_factor_spatial
        return VideoConstraints(self.pipe.vae_scale_factor_temporal, math.lcm(16, spatial * patch))

    @property
    def guidance_scale(self) -> float:
        """Embedded guidance scale during training: the default of the pipeline's `__call__`.

        NOTE: sampling uses `generate.guidance_scale` instead. Training and sampling see the same
        guidance embedding only when that parameter equals this default (6.0 in diffusers 0.42.1).
        """
        return float(inspect.signature(type(self.pipe).__call__).parameters["guidance_scale"].default)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        embeds, pooled, mask = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, max_sequence_length=self.spec.max_sequence_length
        )
        return pack_prompt(embeds, mask, pooled)

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
        video = vae.decode(latents, return_dict=False)[0]
        # (B, 3, F, H, W) in [-1, 1] -> (B, F, H, W, 3) in [0, 1].
        video = ((video.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)
        return to_uint8(video.float().cpu().numpy())

    def sample_timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        # The released checkpoint's scheduler uses a fixed shift of 7.0.
        return shifted_logit_normal(batch_size, generator, float(self.pipe.scheduler.config.get("shift", 1.0)))

    def noisy_latents_and_target(self, latents, noise, sigmas):
        return flow_matching_inputs(latents, noise, sigmas, self.pipe.scheduler.config.num_train_timesteps)

    def predict(self, noisy, timesteps, prompt_embeds):
        transformer = self.denoiser
        embeds, mask, pooled = unpack_prompt(prompt_embeds, transformer.config.pooled_projection_dim)
        guidance = None
        if transformer.config.guidance_embeds:
            # The pipeline embeds the guidance scale times 1000, like a timestep.
            guidance = torch.full((noisy.shape[0],), self.guidance_scale * 1000.0, device=noisy.device, dtype=noisy.dtype)
        return transformer(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=embeds,
            encoder_attention_mask=mask,
            pooled_projections=pooled,
            guidance=guidance,
            return_dict=False,
        )[0]
