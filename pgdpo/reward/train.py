"""Contrastive training of a tiny open_clip model on rendered shapes-world frames and their prompts.

The architecture is open_clip's own CLIP, configured by shapes-clip-tiny.json in this
folder and registered with open_clip.add_model_config, trained with open_clip's
tokenizer and ClipLoss. The result is saved as open_clip_config.json plus
open_clip_model.safetensors, so `open_clip.create_model_and_transforms("local-dir:FOLDER")`
loads it and the CLIP scorers can use it.

One frame shows colour and shape but not the motion direction, so a batch contains one
prompt per (colour, shape) pair: prompts that differ only in direction are never
negatives of each other. Retrieval is counted as correct when the retrieved prompt
has the frame's colour and shape.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from pgdpo.io import canonicalise_safetensors_header
from pgdpo.world import all_attributes, format_prompt, parse_prompt, render_batch

logger = logging.getLogger(__name__)

ARCHITECTURE = "shapes-clip-tiny"
CONFIG_DIR = Path(__file__).resolve().parent
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


@dataclass(frozen=True)
class RewardModelConfig:
    """Settings of one training run; the params.yaml section `reward_model` sets the fields."""

    steps: int = 300
    batch_size: int = 12
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    clips_per_prompt: int = 8
    eval_clips_per_prompt: int = 4
    num_frames: int = 5
    height: int = 32
    width: int = 32
    seed: int = 0


def register_architecture() -> None:
    """Add shapes-clip-tiny.json to open_clip's model configs, once per process."""
    import open_clip

    if ARCHITECTURE not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR / f"{ARCHITECTURE}.json")


def combo_of(prompt: str) -> tuple[str, str]:
    """Return the (colour, shape) pair of a shapes-world prompt."""
    attrs = parse_prompt(prompt)
    return attrs.color, attrs.shape


def render_pool(prompts: list[str], clips_per_prompt: int, cfg: RewardModelConfig, seed: int) -> np.ndarray:
    """Render `clips_per_prompt` clips per prompt: uint8 of shape (P, C, F, H, W, 3)."""
    attrs = [parse_prompt(prompt) for prompt in prompts for _ in range(clips_per_prompt)]
    clips = render_batch(attrs, seed, num_frames=cfg.num_frames, height=cfg.height, width=cfg.width)
    return clips.reshape(len(prompts), clips_per_prompt, *clips.shape[1:])


def preprocess_frames(frames: np.ndarray, preprocess) -> torch.Tensor:
    """Apply open_clip's image transform to uint8 frames (..., H, W, 3); returns (N, 3, S, S)."""
    flat = frames.reshape(-1, *frames.shape[-3:])
    return torch.stack([preprocess(Image.fromarray(frame)) for frame in flat])


def sample_batch(
    combos: dict[tuple[str, str], list[int]], num_clips: int, num_frames: int, batch_size: int, rng: np.random.Generator
) -> list[tuple[int, int, int]]:
    """Draw (prompt, clip, frame) indices, one prompt per (colour, shape) pair and at most `batch_size`."""
    keys = list(combos)
    chosen = rng.permutation(len(keys))[: min(batch_size, len(keys))]
    batch = []
    for key_index in chosen:
        prompt_ids = combos[keys[key_index]]
        batch.append((prompt_ids[rng.integers(len(prompt_ids))], int(rng.integers(num_clips)), int(rng.integers(num_frames))))
    return batch


def group_by_combo(prompts: list[str]) -> dict[tuple[str, str], list[int]]:
    groups: dict[tuple[str, str], list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(combo_of(prompt), []).append(index)
    return groups


@torch.no_grad()
def retrieval_accuracy(model, pixels: torch.Tensor, frame_combos: list[tuple[str, str]], captions: list[str], tokenizer) -> float:
    """Return the fraction of frames whose most similar caption has the frame's colour and shape."""
    image = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
    text = torch.nn.functional.normalize(model.encode_text(tokenizer(captions)), dim=-1)
    best = (image @ text.T).argmax(dim=1).tolist()
    caption_combos = [combo_of(caption) for caption in captions]
    return float(np.mean([caption_combos[index] == combo for index, combo in zip(best, frame_combos)]))


def _eval_set(prompts: list[str], clips: int, cfg: RewardModelConfig, seed: int, preprocess):
    pool = render_pool(prompts, clips, cfg, seed)
    combos = [combo_of(prompt) for prompt in prompts for _ in range(clips * cfg.num_frames)]
    return preprocess_frames(pool, preprocess), combos


def evaluate_retrieval(model, tokenizer, preprocess, train_prompts: list[str], eval_prompts: list[str], cfg: RewardModelConfig) -> dict[str, float]:
    """Measure (colour, shape) retrieval on freshly rendered frames, with the chance level of each metric.

    held_out: eval-prompt frames against the eval prompts; all_prompts: the same frames
    against all 60 prompts; train: train-prompt frames against the train prompts.
    """
    model.eval()
    eval_pixels, eval_combos = _eval_set(eval_prompts, cfg.eval_clips_per_prompt, cfg, cfg.seed + 2, preprocess)
    train_pixels, train_combos = _eval_set(train_prompts, 1, cfg, cfg.seed + 3, preprocess)
    all_prompts = [format_prompt(attrs) for attrs in all_attributes()]
    return {
        "held_out_top1": retrieval_accuracy(model, eval_pixels, eval_combos, eval_prompts, tokenizer),
        "held_out_chance": 1.0 / len(group_by_combo(eval_prompts)),
        "all_prompts_top1": retrieval_accuracy(model, eval_pixels, eval_combos, all_prompts, tokenizer),
        "all_prompts_chance": 1.0 / len(group_by_combo(all_prompts)),
        "train_top1": retrieval_accuracy(model, train_pixels, train_combos, train_prompts, tokenizer),
        "train_chance": 1.0 / len(group_by_combo(train_prompts)),
    }


def save_open_clip(model, model_cfg: dict, out_dir: Path) -> None:
    """Write open_clip_config.json and open_clip_model.safetensors, the layout of open_clip's local-dir: loader."""
    from safetensors.torch import save_file

    preprocess_cfg = {
        key: list(value) if isinstance(value, tuple) else value for key, value in model.visual.preprocess_cfg.items()
    }
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_FILE))
    canonicalise_safetensors_header(out_dir / WEIGHTS_FILE)


def train_reward_model(
    train_prompts: list[str],
    eval_prompts: list[str],
    cfg: RewardModelConfig,
    out_dir: Path,
    on_metrics: Callable[[dict[str, float], int], None] | None = None,
) -> dict[str, float]:
    """Train the tiny CLIP on `train_prompts`, save it to `out_dir` and return its retrieval metrics.

    `on_metrics(metrics, step)` receives the loss every 10 steps. The same config and
    prompts give the same weights on the CPU.
    """
    import open_clip

    if len(group_by_combo(train_prompts)) < 2:
        raise ValueError("reward_model needs train prompts of at least 2 (colour, shape) pairs for contrastive negatives.")
    register_architecture()
    torch.manual_seed(cfg.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(ARCHITECTURE)
    tokenizer = open_clip.get_tokenizer(ARCHITECTURE)
    loss_fn = open_clip.ClipLoss()

    pool = render_pool(train_prompts, cfg.clips_per_prompt, cfg, cfg.seed)
    pixels = preprocess_frames(pool, preprocess)
    pixels = pixels.reshape(*pool.shape[:3], *pixels.shape[1:])  # (prompt, clip, frame, 3, S, S)
    tokens = tokenizer(train_prompts)
    combos = group_by_combo(train_prompts)
    logger.info(
        "training %s on %d prompts (%d colour-shape pairs), %d frames, for %d steps",
        ARCHITECTURE, len(train_prompts), len(combos), pool.shape[0] * pool.shape[1] * pool.shape[2], cfg.steps,
    )

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, cfg.warmup_steps)))
    rng = np.random.default_rng(cfg.seed)
    model.train()
    for step in tqdm(range(cfg.steps), desc="reward_model", unit="step"):
        batch = sample_batch(combos, cfg.clips_per_prompt, cfg.num_frames, cfg.batch_size, rng)
        images = torch.stack([pixels[prompt, clip, frame] for prompt, clip, frame in batch])
        texts = tokens[[prompt for prompt, _, _ in batch]]
        image_features, text_features, logit_scale = model(images, texts)
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            # CLIP caps the learned temperature at 100, as in the original paper.
            model.logit_scale.clamp_(0, np.log(100))
        if on_metrics is not None and (step % 10 == 0 or step == cfg.steps - 1):
            on_metrics({"loss": loss.item(), "logit_scale": logit_scale.item()}, step)

    metrics = evaluate_retrieval(model, tokenizer, preprocess, train_prompts, eval_prompts, cfg)
    metrics["final_loss"] = loss.item()
    logger.info("reward model retrieval: %s", {key: round(value, 4) for key, value in metrics.items()})
    save_open_clip(model, open_clip.get_model_config(ARCHITECTURE), out_dir)
    return metrics

