"""Stage `train`: LoRA preference fine-tuning of the base denoiser on the cached pairs."""

import hashlib
import json
import logging
import shutil

import numpy as np
import torch

from pgdpo.config import Params
from pgdpo.io import atomic_dir, read_table, write_json, write_table
from pgdpo.models import load_base
from pgdpo.pairs import load_latents
from pgdpo.paths import ADAPTER, CHECKPOINTS, METRICS, PAIRS, PLOTS
from pgdpo.stage import stage_main
from pgdpo.tracking import Tracker
from pgdpo.video import file_sha256
from pgdpo.training.lora import add_lora, save_lora
from pgdpo.training.trainer import PairData, TrainConfig, normalise_scores, train_preference

logger = logging.getLogger(__name__)


def load_pair_data(params: Params) -> tuple[PairData, PairData, dict]:
    """Load pairs.csv and the latent cache; split into train and probe pairs."""
    pairs = read_table(PAIRS / "pairs.csv")
    tensors = load_latents(PAIRS / "latents.safetensors")
    score_w, score_l, bounds = normalise_scores(pairs["chosen_score"].to_numpy(), pairs["rejected_score"].to_numpy())
    data = PairData(
        chosen=tensors["chosen"],
        rejected=tensors["rejected"],
        prompt_embeds=tensors["prompt_embeds"],
        score_w=torch.tensor(score_w, dtype=torch.float32),
        score_l=torch.tensor(score_l, dtype=torch.float32),
        pair_ids=pairs["pair_id"].to_numpy(),
    )
    split = pairs["split"].to_numpy()
    return data.subset(np.flatnonzero(split == "train")), data.subset(np.flatnonzero(split == "probe")), bounds


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
    train_pairs, probe_pairs, bounds = load_pair_data(params)
    tracker.log_params({"score_normalisation": bounds})
    logger.info("training on %d pairs, probing %d; scores normalised with %s", len(train_pairs), len(probe_pairs), bounds)

    adapter = load_base(params)
    add_lora(adapter, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets, seed=cfg.seed)
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
    )
    checkpoints = CHECKPOINTS / training_fingerprint(params)
    train_log, probe_log = train_preference(
        adapter, train_pairs, probe_pairs, train_cfg, on_metrics=tracker.log_metrics,
        checkpoint_dir=checkpoints, checkpoint_every=cfg.checkpoint_every,
    )

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


if __name__ == "__main__":
    stage_main("train", run, ["runtime", "base", "train"])
