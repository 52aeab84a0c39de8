"""Adapter for `TextToVideoSDPipeline` (ModelScope text-to-video, UNet3D, DDPM-style epsilon prediction)."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from diffusers import UNet3DConditionModel
from diffusers.loaders import PeftAdapterMixin
from tqdm.auto import tqdm

from pgdpo.models.adapter import VideoConstraints, VideoModelAdapter, to_uint8
from pgdpo.runtime import generators

logger = logging.getLogger(__name__)

# Frames per VAE call: the image VAE encodes and decodes frame by frame, so this bounds its
# activation memory without changing the result.
VAE_FRAME_CHUNK = 8


class PeftUNet3DConditionModel(UNet3DConditionModel, PeftAdapterMixin):
    """`UNet3DConditionModel` with diffusers' PEFT methods (`add_adapter`, `load_lora_adapter`, ...).

    diffusers 0.42.1 leaves `PeftAdapterMixin` out of `UNet3DConditionModel`, so without it
    neither `add_lora` nor the pipeline's own `load_lora_weights` works on this family.
    """


class TextToVideoSDAdapter(VideoModelAdapter):
    """ModelScope: CLIP text encoder, Stable Diffusion image VAE applied per frame, UNet3D denoiser."""

    family = "text_to_video_sd"
    pipeline_class = "TextToVideoSDPipeline"
    # Attention projections of the spatial, temporal and cross-attention layers of the UNet.
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    lora_layers_kwarg = "unet_lora_layers"

    def __init__(self, pipe, spec, device, dtype):
        super().__init__(pipe, spec, device, dtype)
        # NOTE: swaps the class of the loaded UNet in place, and weights and config stay as
        # loaded. The swap is skipped once a diffusers release adds PeftAdapterMixin to the class.
        if not isinstance(pipe.unet, PeftAdapterMixin):
            pipe.unet.__class__ = PeftUNet3DConditionModel
            logger.info("added diffusers' PEFT methods to the loaded UNet3DConditionModel for LoRA")

    def video_constraints(self) -> VideoConstraints:
        # The image VAE encodes each frame alone, so any frame count works; check_inputs requires multiples of 8.
        return VideoConstraints(1, math.lcm(8, self.pipe.vae_scale_factor))

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        # CLIP pads to the tokenizer's model_max_length (77 for the released checkpoint), so
        # `spec.max_sequence_length` does not apply to this family.
        embeds, _ = self.pipe.encode_prompt(
            prompts, self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return embeds

    @torch.no_grad()
    def encode_videos(self, frames: np.ndarray) -> torch.Tensor:
        vae = self.pipe.vae
        batch, num_frames = frames.shape[:2]
        # (B, F, H, W, 3) uint8 -> (B*F, 3, H, W) images in [-1, 1], as the image VAE was trained.
        pixels = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device, vae.dtype)
        pixels = pixels.flatten(0, 1).permute(0, 3, 1, 2) / 127.5 - 1.0
        latents = torch.cat(
            [vae.encode(chunk).latent_dist.mode() for chunk in pixels.split(VAE_FRAME_CHUNK)]
        )
        latents = latents * vae.config.scaling_factor
        # (B*F, C, h, w) -> (B, C, F, h, w), the layout the UNet3D takes.
        return latents.unflatten(0, (batch, num_frames)).permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.pipe.vae
        batch, _, num_frames = latents.shape[:3]
        latents = latents.to(self.device, vae.dtype) / vae.config.scaling_factor
        per_frame = latents.permute(0, 2, 1, 3, 4).flatten(0, 1)
        images = torch.cat([vae.decode(chunk).sample for chunk in per_frame.split(VAE_FRAME_CHUNK)])
        # (B*F, 3, H, W) in [-1, 1] -> (B, F, H, W, 3) in [0, 1].
        video = ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).unflatten(0, (batch, num_frames))
        return to_uint8(video.float().cpu().numpy())

    def sample_timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        # Uniform over the discrete training timesteps, as in DDPM training.
        return torch.rand(batch_size, generator=generator)

    def noisy_latents_and_target(self, latents, noise, sigmas):
        scheduler = self.pipe.scheduler
        num_train_timesteps = scheduler.config.num_train_timesteps
        timesteps = (sigmas * num_train_timesteps).long().clamp(0, num_train_timesteps - 1).to(latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if self.objective == "v_prediction":
            return noisy, timesteps, scheduler.get_velocity(latents, noise, timesteps)
        return noisy, timesteps, noise

    def predict(self, noisy, timesteps, prompt_embeds):
        return self.denoiser(noisy, timesteps, encoder_hidden_states=prompt_embeds, return_dict=False)[0]

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
        """Sample one clip per (prompt, seed) through the pipeline's `__call__`.

        Differs from the base class only in the call: this pipeline takes no
        `max_sequence_length`.
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt")
        clips = []
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
            batch_prompts = prompts[start : start + batch_size]
            output = self.pipe(
                prompt=batch_prompts,
                negative_prompt=[negative_prompt] * len(batch_prompts),
                num_frames=self.spec.num_frames,
                height=self.spec.height,
                width=self.spec.width,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators(seeds[start : start + batch_size]),
                output_type="np",
            )
            clips.append(to_uint8(np.asarray(output.frames)))
        return np.concatenate(clips, axis=0)
