"""Adapter for `AnimateDiffPipeline` (AnimateDiff text-to-video: an image UNet plus motion modules)."""

from __future__ import annotations

from pgdpo.models.families.text_to_video_sd import TextToVideoSDAdapter


class AnimateDiffAdapter(TextToVideoSDAdapter):
    """AnimateDiff: a Stable Diffusion 1.5 pipeline whose UNet gains motion modules (`UNetMotionModel`).

    Prompt encoding, the per-frame image VAE, the (B, C, F, H, W) latents, the DDPM-style
    objective and the `__call__` arguments match ModelScope. Only the denoiser call differs,
    and `UNetMotionModel` already has diffusers' PEFT methods, so the UNet class stays as loaded.
    """

    family = "animatediff"
    pipeline_class = "AnimateDiffPipeline"
    # Attention projections of the image UNet's self- and cross-attention and of the motion modules.
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")

    def predict(self, noisy, timesteps, prompt_embeds):
        # UNetMotionModel runs its image layers on (B * F) frames and expects one copy of the
        # prompt per frame, which AnimateDiffPipeline.__call__ makes with repeat_interleave.
        per_frame = prompt_embeds.repeat_interleave(noisy.shape[2], dim=0)
        return self.denoiser(noisy, timesteps, encoder_hidden_states=per_frame, return_dict=False)[0]
