"""LoRA adapters on the denoiser (peft), saved in the diffusers LoRA format."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from pgdpo.config import LoraForward
from pgdpo.io import canonicalise_safetensors_header
from pgdpo.models.adapter import VideoModelAdapter
from pgdpo.training.lora_forward import set_lora_forward

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"


def add_lora(
    adapter: VideoModelAdapter,
    rank: int,
    alpha: float,
    dropout: float,
    targets: list[str] | None,
    seed: int,
    forward: LoraForward = "auto",
) -> int:
    """Freeze the denoiser and add trainable LoRA layers; return the number of trainable parameters.

    `targets` defaults to the family's `lora_targets`. `forward` picks how the LoRA linear layers
    compute (`pgdpo.training.lora_forward`).
    """
    denoiser = adapter.denoiser
    denoiser.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets or adapter.lora_targets),
        init_lora_weights="gaussian",
    )
    torch.manual_seed(seed)
    denoiser.add_adapter(config, adapter_name=ADAPTER_NAME)
    trainable = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError(f"LoRA targets {config.target_modules} matched no module of {type(denoiser).__name__}")
    # Train LoRA weights in float32 even when the base weights are bf16 or fp16.
    for parameter in denoiser.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    set_lora_forward(denoiser, forward)
    logger.info("LoRA rank %d on %s: %d trainable parameters", rank, config.target_modules, trainable)
    return trainable


def save_lora(adapter: VideoModelAdapter, out_dir: Path) -> Path:
    """Save the denoiser's LoRA weights so that `pipe.load_lora_weights(out_dir)` loads them."""
    denoiser = adapter.denoiser
    state = get_peft_model_state_dict(denoiser, adapter_name=ADAPTER_NAME)
    # The metadata carries lora_alpha and the targets; without it a reload assumes alpha = rank.
    metadata_kwarg = adapter.lora_layers_kwarg.replace("_layers", "_adapter_metadata")
    # peft keeps target_modules as a set, whose order changes between processes; sorting keeps
    # the file byte-identical across runs, which DVC's caching relies on.
    metadata = {
        key: sorted(value) if isinstance(value, set) else value
        for key, value in denoiser.peft_config[ADAPTER_NAME].to_dict().items()
    }
    type(adapter.pipe).save_lora_weights(
        save_directory=str(out_dir),
        safe_serialization=True,
        **{adapter.lora_layers_kwarg: state, metadata_kwarg: metadata},
    )
    weights = Path(out_dir) / "pytorch_lora_weights.safetensors"
    canonicalise_safetensors_header(weights)
    return weights
