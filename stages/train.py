"""Stage `train`: LoRA preference fine-tuning of the base denoiser on the cached pairs.

With `train.num_processes > 1`, the stage relaunches itself through `accelerate launch`,
and each rank trains on its shard of every batch (see `pgdpo.training.parallel`).
"""

import hashlib
import json
import logging
import shutil
import sys

import numpy as np
import torch

from pgdpo.config import Params, ParamsError, load_params
from pgdpo.io import atomic_dir, read_table, write_json, write_table
from pgdpo.models import load_base
from pgdpo.models.compile import compile_denoiser
from pgdpo.pairs import open_latents
from pgdpo.paths import ADAPTER, BASE_MODEL, CHECKPOINTS, METRICS, PAIRS, PLOTS
from pgdpo.runtime import resolve_device
from pgdpo.stage import setup_logging, stage_main
from pgdpo.tracking import Tracker
from pgdpo.tracking_worker import stop_early
from pgdpo.video import file_sha256
from pgdpo.training.lora import add_lora, save_lora
from pgdpo.training.parallel import DataParallel, relaunch
from pgdpo.training.speed import enable_gradient_checkpointing
from pgdpo.training.trainer import PairData, TrainConfig, normalise_scores, train_preference

logger = logging.getLogger(__name__)


def load_pair_data(params: Params) -> tuple[PairData, PairData, dict]:
    """Read pairs.csv and open the latent cache; split into train and probe pairs.

    The latents stay on disk: each batch reads its rows (`LatentRows`).
    """
    pairs = read_table(PAIRS / "pairs.csv")
    latents = open_latents(PAIRS / "latents.safetensors")
    score_w, score_l, bounds = normalise_scores(pairs["chosen_score"].to_numpy(), pairs["rejected_score"].to_numpy())
    score_w = torch.tensor(score_w, dtype=torch.float32)
    score_l = torch.tensor(score_l, dtype=torch.float32)
    pair_ids = pairs["pair_id"].to_numpy()
    split = pairs["split"].to_numpy()

    def part(name: str) -> PairData:
        rows = np.flatnonzero(split == name)
        index = torch.as_tensor(rows, dtype=torch.long)
        return PairData(
            chosen=latents["chosen"].view(rows),
            rejected=latents["rejected"].view(rows),
            prompt_embeds=latents["prompt_embeds"].view(rows),
            score_w=score_w[index],
            score_l=score_l[index],
            pair_ids=pair_ids[rows],
        )

    return part("train"), part("probe"), bounds


def training_fingerprint(params: Params) -> str:
    """Hash of everything a checkpoint depends on, so a changed run never resumes a stale one."""
    digest = hashlib.sha256()
    settings = {"train": params.train.model_dump(), "runtime": params.runtime.model_dump(), "base": params.base.model}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for path in (PAIRS / "pairs.csv", PAIRS / "latents.safetensors"):
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()[:16]


def run(params: Params, tracker: Tracker) -> None:
    cfg = params.train
    tracker.prepare("log_lora_model")
    train_pairs, probe_pairs, bounds = load_pair_data(params)
    tracker.log_params({"score_normalisation": bounds})
    logger.info("training on %d pairs, probing %d; scores normalised with %s", len(train_pairs), len(probe_pairs), bounds)

    parallel = DataParallel.from_env()
    device = parallel.device(resolve_device(params.runtime.device))
    parallel.start(device)
    adapter = load_base(params, training=True, device=device)
    add_lora(adapter, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets, seed=cfg.seed,
             forward=cfg.lora.forward)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(adapter.denoiser)
    if cfg.compile:
        compile_denoiser(adapter.denoiser, cfg.compile_mode)
    train_cfg = TrainConfig(
        method=cfg.method,
        loss=cfg.loss_config(),
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        max_grad_norm=cfg.max_grad_norm,
        probe_every=cfg.probe_every,
        log_every=cfg.log_every,
        seed=cfg.seed,
        autocast=params.runtime.autocast,
        grad_accum_steps=cfg.grad_accum_steps,
    )
    checkpoints = CHECKPOINTS / training_fingerprint(params)
    train_log, probe_log = train_preference(
        adapter, train_pairs, probe_pairs, train_cfg, on_metrics=tracker.log_metrics,
        checkpoint_dir=checkpoints, checkpoint_every=cfg.checkpoint_every, parallel=parallel,
    )
    if not parallel.is_main:
        parallel.stop()
        logger.info("rank %d finished; rank 0 writes the outputs", parallel.rank)
        return

    with atomic_dir(ADAPTER) as tmp:
        save_lora(adapter, tmp)
    write_table(train_log, PLOTS / "train.tsv")
    write_table(probe_log, PLOTS / "probe.tsv")

    final = train_log.iloc[-10:].drop(columns="step").mean().to_dict()
    probe_final = probe_log.iloc[-1].drop(labels="step").to_dict()
    summary = {"train": final, "probe": probe_final, "score_normalisation": bounds, "method": cfg.method}
    write_json(METRICS / "train.json", summary)
    shutil.rmtree(checkpoints, ignore_errors=True)
    tracker.log_artifact(ADAPTER, "adapter")
    tracker.log_artifact(PLOTS / "probe.tsv")
    tracker.log_dataset(PAIRS / "pairs.csv", "pairs", context="training")
    tracker.log_lora_model(params, BASE_MODEL, ADAPTER)
    parallel.stop()


def relaunch_if_parallel() -> None:
    """Rerun this stage under `accelerate launch` when train.num_processes > 1, and exit with its code.

    Does nothing inside a launched rank, or when params.yaml is invalid (stage_main reports that).
    """
    try:
        num_processes = load_params().train.num_processes
    except ParamsError:
        return
    if num_processes == 1 or DataParallel.from_env().active:
        return
    setup_logging()
    # Rank 0 starts its own tracking worker; one started early by `python -m stages` would idle.
    stop_early()
    sys.exit(relaunch("stages.train", num_processes))


if __name__ == "__main__":
    relaunch_if_parallel()
    stage_main("train", run, ["runtime", "base", "train"])
