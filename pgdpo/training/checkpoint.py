"""Training checkpoints: LoRA weights, optimizer, LR schedule and RNG states, written atomically.

A checkpoint is a folder `step-XXXXXXXX` holding `adapter.safetensors` (the LoRA weights),
`state.pt` (optimizer, scheduler and generator states, loaded with `weights_only=True`) and
`logs.json` (the metric rows so far). It is written under a temporary name and renamed, so a
process killed at any point leaves only complete checkpoints. Resuming from one restores every
state that the remaining steps read, so on CPU the final adapter equals that of an
uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "state.pt"
LOGS_FILE = "logs.json"
KEEP = 2


@dataclass
class Resumed:
    """Training progress restored from a checkpoint besides the module and optimizer states."""

    step: int
    train_rows: list[dict]
    probe_rows: list[dict]


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(path for path in root.glob("step-*") if (path / STATE_FILE).is_file())


def save_checkpoint(
    root: Path,
    step: int,
    denoiser: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule,
    generator: torch.Generator,
    train_rows: list[dict],
    probe_rows: list[dict],
) -> Path:
    """Write the checkpoint of `step` and keep only the newest KEEP checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    lora = {key: value.detach().cpu().contiguous() for key, value in get_peft_model_state_dict(denoiser).items()}
    save_file(lora, str(tmp / ADAPTER_FILE))
    torch.save(
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": schedule.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        },
        tmp / STATE_FILE,
    )
    (tmp / LOGS_FILE).write_text(json.dumps({"train": train_rows, "probe": probe_rows}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)

    for old in checkpoint_dirs(root)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest_checkpoint(
    root: Path, denoiser: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule, generator: torch.Generator
) -> Resumed | None:
    """Restore the newest complete checkpoint under `root`; return None when there is none."""
    found = checkpoint_dirs(root)
    if not found:
        return None
    latest = found[-1]
    state = torch.load(latest / STATE_FILE, weights_only=True)
    result = set_peft_model_state_dict(denoiser, load_file(str(latest / ADAPTER_FILE)))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"checkpoint {latest} has LoRA keys the model lacks: {unexpected[:5]}; delete {root} to start over")
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    logs = json.loads((latest / LOGS_FILE).read_text())
    logger.info("resumed training from %s (step %d)", latest, state["step"])
    return Resumed(step=int(state["step"]), train_rows=logs["train"], probe_rows=logs["probe"])
