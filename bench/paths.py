"""The two training-step implementations that `bench.train_step` compares.

`PgdpoPath` is pgdpo's own step: cached latents and prompt embeddings (as the `label` stage
writes them), LoRA on the denoiser in the form `train.lora.forward` picks, Wan's rotary
attention processor, torch's fused AdamW, and the reference pass with the adapters disabled,
through `pgdpo.training.trainer.preference_step`.

`BaselinePath` follows the training loop of SalesforceAIResearch/DiffusionDPO `train.py`
(commit 8d3ee5c): every step it VAE-encodes the chosen and rejected clips in one concatenated
batch and runs the text encoder, and the reference is a separate frozen copy of the denoiser.
It runs the model as diffusers and peft ship it: diffusers' attention processor and VAE norm,
peft's LoRA forward and torch's default AdamW. Unlike that script, which fine-tunes the whole
UNet, its policy has the same LoRA adapters as pgdpo's, so with the same batch, noise and noise
levels both paths compute the same loss up to float32 rounding.
NOTE: that script draws latents with `latent_dist.sample()`. This baseline takes the mode, like
`WanAdapter.encode_videos`, so the two losses can be compared exactly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch

from bench.common import Stopwatch
from bench.models import ClipPairs, load_model
from pgdpo.config import Params
from pgdpo.losses import compute_loss
from pgdpo.models.compile import compile_denoiser
from pgdpo.models.families.wan_attention import use_rotary_processor
from pgdpo.models.families.wan_vae import use_fast_vae_norm
from pgdpo.training.lora import add_lora
from pgdpo.training.trainer import PairData, TrainConfig, make_optimizer, preference_step

# Batch size of the one-off latent encoding, the same as `pgdpo.pairs.cache_latents` uses.
ENCODE_BATCH = 16


def train_config(params: Params, batch_size: int) -> TrainConfig:
    """Build the trainer settings from the `train` section of params.yaml."""
    train = params.train
    return TrainConfig(
        method=train.method,
        loss=train.loss_config(),
        steps=train.steps,
        batch_size=batch_size,
        lr=train.lr,
        weight_decay=train.weight_decay,
        warmup_steps=train.warmup_steps,
        max_grad_norm=train.max_grad_norm,
        probe_every=train.probe_every,
        log_every=train.log_every,
        seed=train.seed,
    )


@dataclass
class StepResult:
    """Loss and diagnostics of one optimizer step, and the seconds each phase took."""

    loss: float
    metrics: dict[str, float]
    phases: dict[str, float] = field(default_factory=dict)


class _LoraPolicy:
    """A benchmark model with LoRA adapters and an AdamW optimizer over them."""

    def __init__(self, model: str, device: torch.device, params: Params, batch_size: int, keep_reference: bool,
                 stock_kernels: bool):
        self.device = device
        self.adapter = load_model(model, device, seed=0)
        lora = params.train.lora
        if stock_kernels:
            # The model as diffusers and peft ship it, with torch's default AdamW.
            use_rotary_processor(self.adapter.denoiser, enabled=False)
            use_fast_vae_norm(self.adapter.pipe.vae, enabled=False)
        # The separate reference copy is taken before LoRA is added, as a frozen full model.
        self.reference = copy.deepcopy(self.adapter.denoiser).requires_grad_(False).eval() if keep_reference else None
        add_lora(self.adapter, lora.rank, lora.alpha, lora.dropout, lora.targets, seed=params.train.seed,
                 forward="peft" if stock_kernels else lora.forward)
        self.cfg = train_config(params, batch_size)
        self.parameters = [p for p in self.adapter.denoiser.parameters() if p.requires_grad]
        self.optimizer = (
            torch.optim.AdamW(self.parameters, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
            if stock_kernels
            else make_optimizer(self.parameters, self.cfg)
        )
        self.adapter.denoiser.train()

    def update(self, loss: torch.Tensor, phases: dict[str, float]) -> None:
        """Backward, clip and optimizer step, as `train_preference` does them, timing each."""
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} in the benchmark step")
        with Stopwatch(self.device) as watch:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        phases["backward"] = watch.seconds
        with Stopwatch(self.device) as watch:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.parameters, self.cfg.max_grad_norm))
        phases["grad_norm_clip"] = watch.seconds
        if not np.isfinite(grad_norm):
            raise FloatingPointError("non-finite gradient norm in the benchmark step")
        with Stopwatch(self.device) as watch:
            self.optimizer.step()
        phases["optimizer"] = watch.seconds

    @torch.no_grad()
    def copy_lora_from(self, other: _LoraPolicy) -> None:
        """Set this path's LoRA weights to those of `other` (the optimizer state is kept)."""
        if other is self:
            return
        for mine, theirs in zip(self.parameters, other.parameters, strict=True):
            mine.copy_(theirs)

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of parameters and buffers of each model component this path keeps."""
        modules = {
            "denoiser": self.adapter.denoiser,
            "vae": self.adapter.pipe.vae,
            "text_encoder": self.adapter.pipe.text_encoder,
        }
        if self.reference is not None:
            modules["reference_copy"] = self.reference
        return {name: _module_bytes(module) for name, module in modules.items()}


class PgdpoPath(_LoraPolicy):
    """pgdpo's step on cached latents, with the reference pass = adapters disabled.

    With `stock_kernels`, the model runs as diffusers and peft ship it, as in the baseline. That
    separates what caching and the shared reference save from what pgdpo's kernels save.
    """

    name = "pgdpo"

    def __init__(self, model: str, device: torch.device, params: Params, clips: ClipPairs, batch_size: int,
                 compiled: bool = False, stock_kernels: bool = False):
        super().__init__(model, device, params, batch_size, keep_reference=False, stock_kernels=stock_kernels)
        self.pairs = encode_pairs(self.adapter, clips)
        if compiled:
            compile_denoiser(self.adapter.denoiser)

    def step(self, rows: np.ndarray, noise: torch.Tensor, sigmas: torch.Tensor) -> StepResult:
        phases: dict[str, float] = {}
        with Stopwatch(self.device) as watch:
            batch = self.pairs.subset(rows)
            output = preference_step(self.adapter, batch, self.cfg, noise, sigmas)
        phases["forward_policy_reference_loss"] = watch.seconds
        self.update(output.loss, phases)
        return StepResult(float(output.loss.detach()), output.metrics, phases)


class BaselinePath(_LoraPolicy):
    """Public-script step: encode both clips every step, separate reference copy, one 2B batch,
    the model as diffusers and peft ship it."""

    name = "baseline"

    def __init__(self, model: str, device: torch.device, params: Params, clips: ClipPairs, batch_size: int):
        super().__init__(model, device, params, batch_size, keep_reference=True, stock_kernels=True)
        self.clips = clips

    def step(self, rows: np.ndarray, noise: torch.Tensor, sigmas: torch.Tensor) -> StepResult:
        adapter, size = self.adapter, len(rows)
        phases: dict[str, float] = {}

        # 1. Encode chosen and rejected clips as one batch (2B, C, F, H, W), chosen first, and the prompts.
        with Stopwatch(self.device) as watch:
            pixels = np.concatenate([self.clips.chosen[rows], self.clips.rejected[rows]])
            latents = adapter.encode_videos(pixels)
            embeds = adapter.encode_prompts([self.clips.prompts[i] for i in rows])
            embeds = torch.cat([embeds, embeds])
        phases["encode_videos_prompts"] = watch.seconds

        # 2. Policy and reference predictions on the same noised batch; noise and levels shared per pair.
        with Stopwatch(self.device) as watch:
            noisy, timesteps, target = adapter.noisy_latents_and_target(
                latents, torch.cat([noise, noise]).to(self.device), torch.cat([sigmas, sigmas]).to(self.device)
            )
            prediction = adapter.predict(noisy, timesteps, embeds)
            with torch.no_grad():
                reference = self.reference(
                    hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds, return_dict=False
                )[0]
            errors = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
            ref_errors = (reference.float() - target.float()).pow(2).flatten(1).mean(dim=1)
            output = compute_loss(
                self.cfg.method,
                self.cfg.loss,
                policy_err_w=errors[:size],
                policy_err_l=errors[size:],
                ref_err_w=ref_errors[:size],
                ref_err_l=ref_errors[size:],
                score_w=self.clips.score_w[rows].to(self.device),
                score_l=self.clips.score_l[rows].to(self.device),
                policy_pred=prediction,
                target=target,
            )
        phases["forward_policy_reference_loss"] = watch.seconds
        self.update(output.loss, phases)
        return StepResult(float(output.loss.detach()), output.metrics, phases)


PATHS = {"baseline": BaselinePath, "pgdpo": PgdpoPath}


@torch.no_grad()
def encode_pairs(adapter, clips: ClipPairs) -> PairData:
    """Encode every clip and prompt once, as the `label` stage caches them for training."""
    chosen, rejected, embeds = [], [], []
    for start in range(0, len(clips.prompts), ENCODE_BATCH):
        stop = start + ENCODE_BATCH
        chosen.append(adapter.encode_videos(clips.chosen[start:stop]).float().cpu())
        rejected.append(adapter.encode_videos(clips.rejected[start:stop]).float().cpu())
        embeds.append(adapter.encode_prompts(clips.prompts[start:stop]).float().cpu())
    return PairData(
        chosen=torch.cat(chosen),
        rejected=torch.cat(rejected),
        prompt_embeds=torch.cat(embeds),
        score_w=clips.score_w,
        score_l=clips.score_l,
        pair_ids=np.arange(len(clips.prompts)),
    )


def step_inputs(adapter, clips: ClipPairs, batch_size: int, seed: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Draw the rows, noise and noise levels of one step from `seed`, the same for both paths."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(len(clips.prompts), (batch_size,), generator=generator).numpy()
    spec = adapter.spec
    z_dim = adapter.pipe.vae.config.z_dim
    frames = (spec.num_frames - 1) // adapter.pipe.vae_scale_factor_temporal + 1
    shape = (batch_size, z_dim, frames, spec.height // adapter.pipe.vae_scale_factor_spatial,
             spec.width // adapter.pipe.vae_scale_factor_spatial)
    noise = torch.randn(shape, generator=generator)
    sigmas = adapter.sample_timesteps(batch_size, generator)
    return rows, noise, sigmas


def _module_bytes(module: torch.nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
