"""Train the shapes-world base model: a small `WanPipeline` learned from rendered clips.

Two phases, both on clips drawn by `pgdpo.world.render`:
1. the VAE learns to reconstruct clips; its per-channel latent mean and std go into its config,
   as released Wan VAEs carry them;
2. the transformer learns flow matching on the frozen VAE's latents of the train prompts,
   with 10% of prompts dropped to the empty prompt so classifier-free guidance works.

The result is saved with `save_pretrained` and reloads with `WanPipeline.from_pretrained`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pgdpo.models.adapter import VideoSpec, write_video_spec
from pgdpo.models.families.wan import WanAdapter
from pgdpo.models.tiny_wan import TinyWanConfig, build_pipeline
from pgdpo.world import COLORS, DIRECTIONS, SHAPES, parse_prompt, render_batch

logger = logging.getLogger(__name__)

MetricsCallback = Callable[[str, dict[str, float], int], None]


@dataclass
class ShapesBaseConfig:
    """Training settings of the shapes-world base model (the `base` section of params.yaml)."""

    num_frames: int = 5
    height: int = 32
    width: int = 32
    fps: int = 8
    vae_steps: int = 300
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    transformer_steps: int = 2000
    transformer_lr: float = 1e-3
    batch_size: int = 8
    clips_per_prompt: int = 24
    prompt_dropout: float = 0.1
    log_every: int = 25
    seed: int = 0
    model: TinyWanConfig = field(default_factory=TinyWanConfig)


def world_vocabulary() -> list[str]:
    """Return every word the shapes-world grammar can produce."""
    return ["a", "moving", *COLORS, *SHAPES, *DIRECTIONS]


def train_vae(vae, prompts: list[str], cfg: ShapesBaseConfig, on_metrics: MetricsCallback | None) -> None:
    """Fit the VAE to rendered clips, then store the latent mean and std in its config."""
    rng = np.random.default_rng(cfg.seed)
    # torch's fused AdamW updates all tensors in one call (the base always trains on CPU in float32).
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0, fused=True)
    generator = torch.Generator().manual_seed(cfg.seed)
    vae.train()

    # NOTE: the VAE trains on clips of the full length. Trained on 5-frame clips, it decoded
    # frames 5 to 8 of 9-frame clips with drifting colours.
    for step in tqdm(range(1, cfg.vae_steps + 1), desc="base: vae", unit="step"):
        clips = _render(prompts, cfg, rng)
        posterior = vae.encode(clips).latent_dist
        reconstruction = _decode_unclamped(vae, posterior.sample(generator))
        mse = torch.nn.functional.mse_loss(reconstruction, clips)
        kl = posterior.kl().mean()
        loss = mse + cfg.vae_kl_weight * kl

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        if on_metrics and (step % cfg.log_every == 0 or step == cfg.vae_steps):
            on_metrics("base/vae", {"mse": mse.item(), "kl": kl.item()}, step)

    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(_render(prompts, cfg, rng)).latent_dist.mode() for _ in range(8)])
    # Per-channel statistics over batch, frames and pixels: (C,)
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    logger.info("vae latent mean %s std %s", np.round(mean.numpy(), 3), np.round(std.numpy(), 3))


def train_transformer(
    adapter: WanAdapter, prompts: list[str], cfg: ShapesBaseConfig, on_metrics: MetricsCallback | None
) -> None:
    """Train the transformer with the flow-matching loss on cached latents of rendered clips."""
    rng = np.random.default_rng(cfg.seed + 1)
    generator = torch.Generator().manual_seed(cfg.seed + 1)

    # Cache latents once: clips_per_prompt clips for every train prompt.
    dataset_prompts = [prompt for prompt in prompts for _ in range(cfg.clips_per_prompt)]
    latents = []
    for start in tqdm(range(0, len(dataset_prompts), 32), desc="base: encode clips", unit="batch"):
        batch = dataset_prompts[start : start + 32]
        frames = render_batch([parse_prompt(p) for p in batch], seed=int(rng.integers(2**31)), **_video_kw(cfg))
        latents.append(adapter.encode_videos(frames))
    latents = torch.cat(latents)
    prompt_index = {prompt: i for i, prompt in enumerate(prompts)}
    labels = torch.tensor([prompt_index[p] for p in dataset_prompts])
    embeds = adapter.encode_prompts([*prompts, ""])  # the last row is the empty prompt

    transformer = adapter.denoiser
    transformer.train()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=cfg.transformer_lr, weight_decay=0.01, fused=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.transformer_lr, total_steps=cfg.transformer_steps, pct_start=0.05
    )

    for step in tqdm(range(1, cfg.transformer_steps + 1), desc="base: transformer", unit="step"):
        index = torch.randint(len(latents), (cfg.batch_size,), generator=generator)
        x0 = latents[index]
        rows = labels[index].clone()
        rows[torch.rand(cfg.batch_size, generator=generator) < cfg.prompt_dropout] = len(prompts)

        noise = torch.randn(x0.shape, generator=generator)
        sigmas = adapter.sample_timesteps(cfg.batch_size, generator)
        noisy, timesteps, target = adapter.noisy_latents_and_target(x0, noise, sigmas)
        prediction = adapter.predict(noisy, timesteps, embeds[rows])
        loss = torch.nn.functional.mse_loss(prediction, target)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()

        if on_metrics and (step % cfg.log_every == 0 or step == cfg.transformer_steps):
            on_metrics("base/transformer", {"loss": loss.item()}, step)

    transformer.eval()


def train_shapes_base(
    prompts: list[str], cfg: ShapesBaseConfig, output_dir: Path, on_metrics: MetricsCallback | None = None
) -> WanAdapter:
    """Build, train and save the shapes-world base pipeline to `output_dir`.

    Returns:
        The trained pipeline wrapped in its adapter (on CPU, float32).
    """
    if not prompts:
        raise ValueError("train_shapes_base needs at least one train prompt; the prompts stage wrote none")
    torch.manual_seed(cfg.seed)
    cfg.model.vocabulary = world_vocabulary()
    pipe = build_pipeline(cfg.model, seed=cfg.seed)
    pipe.text_encoder.requires_grad_(False)
    spec = VideoSpec(
        num_frames=cfg.num_frames,
        height=cfg.height,
        width=cfg.width,
        fps=cfg.fps,
        max_sequence_length=cfg.model.max_sequence_length,
    )
    adapter = WanAdapter(pipe, spec, torch.device("cpu"), torch.float32)

    train_vae(pipe.vae, prompts, cfg, on_metrics)
    pipe.vae.requires_grad_(False)
    train_transformer(adapter, prompts, cfg, on_metrics)

    output_dir = Path(output_dir)
    pipe.save_pretrained(output_dir)
    write_video_spec(output_dir, spec)
    logger.info("saved shapes-world base pipeline to %s", output_dir)
    return adapter


def _decode_unclamped(vae, latents: torch.Tensor) -> torch.Tensor:
    """Decode through the VAE's own `decode` but return the decoder output before its clamp.

    `AutoencoderKLWan.decode` clamps to [-1, 1], which has zero gradient outside that range: a
    decoder that drifts below -1 on the black background never recovers. The forward hook
    collects the decoder's per-frame outputs, which `decode` concatenates along time.
    """
    chunks: list[torch.Tensor] = []
    handle = vae.decoder.register_forward_hook(lambda module, args, output: chunks.append(output))
    try:
        vae.decode(latents)
    finally:
        handle.remove()
    return torch.cat(chunks, dim=2)


def _video_kw(cfg: ShapesBaseConfig) -> dict:
    return {"num_frames": cfg.num_frames, "height": cfg.height, "width": cfg.width}


def _render(prompts: list[str], cfg: ShapesBaseConfig, rng: np.random.Generator) -> torch.Tensor:
    """Render a random batch of clips as a (B, 3, F, H, W) tensor in [-1, 1]."""
    chosen = rng.choice(len(prompts), size=cfg.batch_size)
    frames = render_batch([parse_prompt(prompts[i]) for i in chosen], seed=int(rng.integers(2**31)), **_video_kw(cfg))
    return torch.from_numpy(frames).float().permute(0, 4, 1, 2, 3) / 127.5 - 1.0
