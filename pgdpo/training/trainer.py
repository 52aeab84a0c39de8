"""LoRA preference fine-tuning on cached latents: one loss from `pgdpo.losses`, one reference pass.

Per step, for a batch of B pairs:
1. chosen and rejected latents share one noise draw and one noise level per pair;
2. the policy (LoRA on) predicts on the (2B, ...) batch, chosen first;
3. the reference is the same denoiser with its adapters disabled, under no_grad, so no second
   copy of the model is held;
4. per-sample errors go to `compute_loss`, which returns the loss and its diagnostics.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pgdpo.losses import LossConfig, compute_loss
from pgdpo.models.adapter import VideoModelAdapter
from pgdpo.runtime import autocast
from pgdpo.training.checkpoint import load_latest_checkpoint, save_checkpoint
from pgdpo.training.parallel import DataParallel

logger = logging.getLogger(__name__)

MetricsCallback = Callable[[dict[str, float], int], None]

# Noise levels of the held-out probe: fixed, so probe rows are comparable across steps and runs.
PROBE_SIGMAS = (0.25, 0.5, 0.75)


@dataclass
class TrainConfig:
    method: str
    loss: LossConfig
    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    probe_every: int = 10
    log_every: int = 5
    seed: int = 0
    autocast: str = "float32"
    grad_accum_steps: int = 1


@dataclass
class PairData:
    """Cached tensors of a set of pairs; row i of every tensor belongs to pair_ids[i]."""

    # A tensor, or a `pgdpo.pairs.LatentRows` that reads rows from the latent cache when indexed.
    chosen: torch.Tensor  # (N, C, F, H, W) latents
    rejected: torch.Tensor  # (N, C, F, H, W) latents
    prompt_embeds: torch.Tensor  # (N, L, D)
    score_w: torch.Tensor  # (N,) normalised to [0, 1]
    score_l: torch.Tensor  # (N,)
    pair_ids: np.ndarray  # (N,)

    def subset(self, rows: np.ndarray) -> PairData:
        index = torch.as_tensor(rows, dtype=torch.long)
        return PairData(
            self.chosen[index], self.rejected[index], self.prompt_embeds[index],
            self.score_w[index], self.score_l[index], self.pair_ids[rows],
        )

    def __len__(self) -> int:
        return len(self.pair_ids)


def normalise_scores(chosen: np.ndarray, rejected: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Min-max normalise both score columns jointly to [0, 1]; return them and the min and max used."""
    low = float(min(chosen.min(), rejected.min()))
    high = float(max(chosen.max(), rejected.max()))
    span = high - low if high > low else 1.0
    return (chosen - low) / span, (rejected - low) / span, {"score_min": low, "score_max": high}


def pair_errors(
    adapter: VideoModelAdapter,
    batch: PairData,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    reference: bool,
    autocast_dtype: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return per-sample errors (2B,), predictions and targets of one forward pass over [chosen; rejected].

    `noise` has the latent shape (B, ...) and `sigmas` is (B,): both are shared by the chosen and
    rejected sample of a pair. With `reference=True` the adapters are disabled and no graph is kept.
    """
    device = adapter.device
    latents = torch.cat([batch.chosen, batch.rejected]).to(device)  # (2B, C, F, H, W), chosen first
    embeds = torch.cat([batch.prompt_embeds, batch.prompt_embeds]).to(device, adapter.dtype)
    noisy, timesteps, target = adapter.noisy_latents_and_target(
        latents, torch.cat([noise, noise]).to(device), torch.cat([sigmas, sigmas]).to(device)
    )
    denoiser = adapter.denoiser
    if reference:
        denoiser.disable_adapters()
    try:
        # Under an outer no_grad (the probe) the policy pass keeps no graph either.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not reference), autocast(device, autocast_dtype):
            prediction = adapter.predict(noisy.to(adapter.dtype), timesteps, embeds)
    finally:
        if reference:
            denoiser.enable_adapters()
    # Per-sample MSE in float32: D values are ~1e-3 of the error and bf16 cannot resolve them.
    errors = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return errors, prediction, target


def reference_errors(
    adapter: VideoModelAdapter, batch: PairData, cfg: TrainConfig, noise: torch.Tensor, sigmas: torch.Tensor
) -> torch.Tensor:
    """Return the reference model's per-sample errors (2B,) of one batch, without a graph."""
    with torch.no_grad():
        errors, _, _ = pair_errors(adapter, batch, noise, sigmas, reference=True, autocast_dtype=cfg.autocast)
    return errors


def preference_step(
    adapter: VideoModelAdapter,
    batch: PairData,
    cfg: TrainConfig,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    ref_err: torch.Tensor | None = None,
):
    """Compute the loss output of one batch (policy with gradient, reference without).

    `ref_err`, if given, holds the reference errors of this exact batch, noise and sigmas, and
    replaces the reference pass.
    """
    policy_err, prediction, target = pair_errors(adapter, batch, noise, sigmas, reference=False, autocast_dtype=cfg.autocast)
    if ref_err is None:
        ref_err = reference_errors(adapter, batch, cfg, noise, sigmas)
    size = len(batch)
    return compute_loss(
        cfg.method,
        cfg.loss,
        policy_err_w=policy_err[:size],
        policy_err_l=policy_err[size:],
        ref_err_w=ref_err[:size],
        ref_err_l=ref_err[size:],
        score_w=batch.score_w.to(policy_err.device),
        score_l=batch.score_l.to(policy_err.device),
        policy_pred=prediction,
        target=target,
    )


def accumulate_gradients(
    adapter: VideoModelAdapter,
    batch: PairData,
    cfg: TrainConfig,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    step: int,
    parallel: DataParallel,
) -> list[tuple[int, dict[str, float]]]:
    """Run forward and backward over this process's `cfg.grad_accum_steps` micro-batches of `batch`.

    Each micro-batch loss is scaled by its share of the global batch, so the gradients summed
    over micro-batches (and over ranks, after `DataParallel.sum_gradients`) are those of the
    global batch's mean loss. This is exact for losses that are a mean of per-pair terms.
    NOTE: kto's reference point and sdpo's lambda with scope='batch' are batch statistics, so
    with several micro-batches or ranks they are computed per micro-batch and differ from one
    full batch.

    Returns:
        (number of pairs, loss metrics) of each micro-batch.
    """
    parts = []
    for rows in np.array_split(parallel.shard(len(batch)), cfg.grad_accum_steps):
        index = torch.as_tensor(rows, dtype=torch.long)
        micro = batch.subset(rows)
        output = preference_step(adapter, micro, cfg, noise[index], sigmas[index])
        if not torch.isfinite(output.loss):
            raise FloatingPointError(f"non-finite loss {output.loss.item()} at step {step}, pair ids {micro.pair_ids.tolist()}")
        (output.loss * (len(rows) / len(batch))).backward()
        parts.append((len(rows), output.metrics))
    return parts


def combine_metrics(parts: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Merge micro-batch metrics into those of the whole batch: minima and maxima as such, the rest
    as means weighted by pair count."""
    total = sum(count for count, _ in parts)
    merged = {}
    for key in parts[0][1]:
        values = [metrics[key] for _, metrics in parts]
        if key.endswith("_min"):
            merged[key] = min(values)
        elif key.endswith("_max"):
            merged[key] = max(values)
        else:
            merged[key] = sum(count * metrics[key] for count, metrics in parts) / total
    return merged


class LikelihoodProbe:
    """Chosen and rejected error differences on fixed held-out pairs, timesteps and noise."""

    def __init__(self, adapter: VideoModelAdapter, probe: PairData, cfg: TrainConfig):
        self.adapter = adapter
        self.cfg = cfg
        repeats = len(PROBE_SIGMAS)
        rows = np.repeat(np.arange(len(probe)), repeats)
        self.batch = probe.subset(rows)
        generator = torch.Generator().manual_seed(cfg.seed + 7919)
        self.noise = torch.randn(self.batch.chosen.shape, generator=generator)
        self.sigmas = torch.tensor(PROBE_SIGMAS * len(probe), dtype=torch.float32)
        # The reference (adapters disabled) never changes and the probe inputs are fixed, so its
        # errors are computed at the first measurement and reused, which halves the probe's cost.
        self.ref_err: torch.Tensor | None = None

    @torch.no_grad()
    def measure(self) -> dict[str, float]:
        if self.ref_err is None:
            self.ref_err = reference_errors(self.adapter, self.batch, self.cfg, self.noise, self.sigmas)
        output = preference_step(self.adapter, self.batch, self.cfg, self.noise, self.sigmas, ref_err=self.ref_err)
        return output.metrics


def make_optimizer(parameters: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """Return AdamW over `parameters`, with torch's fused kernel on CPU and CUDA.

    On CPU the default AdamW updates each LoRA tensor with its own handful of operations. The
    fused kernel updates all of them in one call (the "optimizer" phase in BENCHMARKS.md). The
    update is the same up to float32 rounding.
    """
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in parameters)
    return torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def train_preference(
    adapter: VideoModelAdapter,
    train: PairData,
    probe: PairData,
    cfg: TrainConfig,
    on_metrics: MetricsCallback | None = None,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 0,
    parallel: DataParallel | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run `cfg.steps` optimizer steps of preference training on the LoRA parameters.

    With `checkpoint_dir` and `checkpoint_every > 0`, a checkpoint is written every
    `checkpoint_every` steps, and training resumes from the newest checkpoint found there.
    With an active `parallel`, each rank trains on its shard of every batch, and only rank 0
    runs the probe and writes checkpoints. Its logs hold the metrics of the whole batch.

    Returns:
        (train log, probe log): one row per step with every loss metric and the gradient norm,
        and one row per probe with the probe metrics.

    Raises:
        FloatingPointError: on a non-finite loss or gradient, naming the step and pair ids.
    """
    if len(train) == 0:
        raise ValueError("no training pairs; check label.min_margin and label.num_probe_pairs")
    denoiser = adapter.denoiser
    parameters = [p for p in denoiser.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("the denoiser has no trainable parameters; add LoRA adapters before training")
    optimizer = make_optimizer(parameters, cfg)
    warmup = max(cfg.warmup_steps, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    generator = torch.Generator().manual_seed(cfg.seed)
    probe_runner = LikelihoodProbe(adapter, probe, cfg)
    parallel = parallel or DataParallel()
    parallel.broadcast_parameters(parameters)

    train_rows: list[dict] = []
    probe_rows: list[dict] = []
    first_step = 1
    resumed = load_latest_checkpoint(checkpoint_dir, denoiser, optimizer, schedule, generator) if checkpoint_dir else None
    if resumed is not None:
        first_step = resumed.step + 1
        train_rows, probe_rows = resumed.train_rows, resumed.probe_rows
    elif parallel.is_main:
        probe_rows.append({"step": 0, **probe_runner.measure()})

    denoiser.train()
    for step in tqdm(range(first_step, cfg.steps + 1), desc=f"train {cfg.method}", unit="step", initial=first_step - 1, total=cfg.steps):
        rows = torch.randint(len(train), (cfg.batch_size,), generator=generator).numpy()
        batch = train.subset(rows)
        noise = torch.randn(batch.chosen.shape, generator=generator)
        sigmas = adapter.sample_timesteps(len(batch), generator)

        optimizer.zero_grad(set_to_none=True)
        parts = accumulate_gradients(adapter, batch, cfg, noise, sigmas, step, parallel)
        parallel.sum_gradients(parameters)
        loss_metrics = combine_metrics([part for rank_parts in parallel.gather(parts) for part in rank_parts])
        grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, cfg.max_grad_norm))
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"non-finite gradient norm at step {step}, pair ids {batch.pair_ids.tolist()}")
        optimizer.step()
        schedule.step()

        metrics = {**loss_metrics, "grad_norm": grad_norm, "lr": schedule.get_last_lr()[0]}
        train_rows.append({"step": step, **metrics})
        if on_metrics and (step % cfg.log_every == 0 or step == cfg.steps):
            on_metrics({f"train/{key}": value for key, value in metrics.items()}, step)

        if parallel.is_main and (step % cfg.probe_every == 0 or step == cfg.steps):
            denoiser.eval()
            probe_metrics = probe_runner.measure()
            denoiser.train()
            probe_rows.append({"step": step, **probe_metrics})
            if on_metrics:
                on_metrics({f"probe/{key}": value for key, value in probe_metrics.items()}, step)

        if parallel.is_main and checkpoint_dir and checkpoint_every and step % checkpoint_every == 0 and step < cfg.steps:
            save_checkpoint(checkpoint_dir, step, denoiser, optimizer, schedule, generator, train_rows, probe_rows)

    denoiser.eval()
    return pd.DataFrame(train_rows), pd.DataFrame(probe_rows)
