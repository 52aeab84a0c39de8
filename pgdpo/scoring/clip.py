"""CLIP-based scorers (open_clip): clip_score, background_consistency, appearance_style, aesthetic_quality.

The scorers need the "clip" resource (and aesthetic_quality the "aesthetic" one), which
load_resources builds once per scoring run from params.yaml's scoring.clip and
scoring.aesthetic sections. Weights load through open_clip.create_model_and_transforms
from a pretrained tag (downloaded into open_clip's cache on first use), a local
checkpoint file, or a `local-dir:` folder such as the `reward_model` stage's output.
docs/scoring.md lists each formula and where it follows or departs from VBench.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pgdpo.scoring.registry import register, register_resource, validate_clip

logger = logging.getLogger(__name__)

LOCAL_DIR_PREFIX = "local-dir:"
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

# VBench's aesthetic_quality divides the LAION predictor's output (about 1 to 10) by 10.
AESTHETIC_SCALE = 10.0


class ClipWeightsError(RuntimeError):
    """Raised when the CLIP weights named in params are missing and cannot be loaded."""


def _how_to_provide(model: str, pretrained: str | None) -> str:
    return (
        "To provide them: on a machine with network access run "
        f"`python -c \"import open_clip; open_clip.create_model_and_transforms({model!r}, pretrained={pretrained!r}, "
        "cache_dir='PATH')\"`, copy PATH here, and set scoring.clip.cache_dir to PATH with HF_HUB_OFFLINE=1; "
        "or set scoring.clip.pretrained to a local checkpoint file (.safetensors, .bin or .pt); "
        "or set scoring.clip.model to 'local-dir:FOLDER' holding open_clip_config.json and the weights."
    )


def _check_local_weights(model: str, pretrained: str | None) -> None:
    """Raise ClipWeightsError naming the path when a local folder or checkpoint file does not exist."""
    if model.startswith(LOCAL_DIR_PREFIX):
        folder = Path(model[len(LOCAL_DIR_PREFIX) :])
        if not (folder / "open_clip_config.json").is_file():
            raise ClipWeightsError(
                f"CLIP weights not found: scoring.clip.model is {model!r}, but {folder / 'open_clip_config.json'} "
                "does not exist. For data/reward_model run `dvc repro reward_model` first; otherwise "
                + _how_to_provide(model, pretrained)
            )
        return
    if pretrained and (pretrained.endswith(CHECKPOINT_SUFFIXES) or os.sep in pretrained):
        if not Path(pretrained).is_file():
            raise ClipWeightsError(
                f"CLIP weights not found: scoring.clip.pretrained is the path {pretrained!r} for model {model!r}, "
                "and no such file exists. " + _how_to_provide(model, None)
            )


class ClipModel:
    """An open_clip model with its preprocessing and tokenizer, returning unit-norm features.

    Text features are cached per text, because every clip of a prompt shares them.
    """

    def __init__(self, model: torch.nn.Module, preprocess, tokenizer, device: torch.device, name: str):
        self.model = model.eval().to(device)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.name = name
        self._text_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def image_features(self, frames: np.ndarray) -> torch.Tensor:
        """Encode uint8 RGB frames (F, H, W, 3) into unit-norm float64 features (F, D) on the CPU."""
        validate_clip(frames)
        pixels = torch.stack([self.preprocess(Image.fromarray(frame)) for frame in frames]).to(self.device)
        features = self.model.encode_image(pixels).double().cpu()
        return torch.nn.functional.normalize(features, dim=-1)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """Encode texts into unit-norm float64 features (N, D) on the CPU."""
        missing = [text for text in dict.fromkeys(texts) if text not in self._text_cache]
        if missing:
            tokens = self.tokenizer(missing).to(self.device)
            features = torch.nn.functional.normalize(self.model.encode_text(tokens).double().cpu(), dim=-1)
            self._text_cache.update(zip(missing, features))
        return torch.stack([self._text_cache[text] for text in texts])

    def __repr__(self) -> str:
        return f"ClipModel({self.name!r}, device={self.device})"


def load_clip(options: Mapping[str, Any]) -> ClipModel:
    """Load the open_clip model named by `options` (scoring.clip: model, pretrained, cache_dir, device).

    Raises ClipWeightsError naming the weights and how to provide them when a local
    path does not exist or open_clip cannot load or download the weights.
    """
    import open_clip

    model_name = str(options.get("model") or "")
    if not model_name:
        raise ClipWeightsError("Missing scoring.clip.model: set it to an open_clip model name or 'local-dir:FOLDER'.")
    pretrained = options.get("pretrained")
    cache_dir = options.get("cache_dir")
    device = torch.device(options.get("device") or "cpu")
    _check_local_weights(model_name, pretrained)

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=None if model_name.startswith(LOCAL_DIR_PREFIX) else pretrained,
            cache_dir=cache_dir, device=device,
        )
        tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
    except (RuntimeError, OSError, ValueError) as error:
        raise ClipWeightsError(
            f"Could not load CLIP weights model={model_name!r} pretrained={pretrained!r} "
            f"(cache_dir={cache_dir!r}): {error}. " + _how_to_provide(model_name, pretrained)
        ) from error
    if model_name.startswith(LOCAL_DIR_PREFIX) or pretrained:
        logger.info("Loaded CLIP %s (pretrained=%s) on %s", model_name, pretrained, device)
    else:
        logger.warning("CLIP %s has no pretrained weights (scoring.clip.pretrained is empty), so its scores are random", model_name)
    return ClipModel(model, preprocess, tokenizer, device, model_name)


register_resource("clip", load_clip)


def style_phrase(prompt: str) -> str:
    """Return the style part of a prompt: the text after its last ", ", or the whole prompt without one.

    VBench's appearance_style prompts end in the style ("..., oil painting"), and
    VBench reads the phrase from VBench_full_info.json. This rule gets the same
    phrase for most of them, but only "in the style of Ukiyo" from "... by Hokusai,
    in the style of Ukiyo".
    """
    head, separator, tail = prompt.rpartition(", ")
    return tail.strip() if separator and tail.strip() else prompt


def _frame_text_similarity(clip: ClipModel, frames: np.ndarray, text: str) -> float:
    similarities = clip.image_features(frames) @ clip.text_features([text])[0]
    return float(similarities.mean())


@register("clip_score", group="semantic", needs={"frames", "prompt", "clip"})
def clip_score(frames: np.ndarray, prompt: str, clip: ClipModel) -> float:
    """Return the cosine similarity of the prompt's CLIP text feature with each frame's, averaged over frames."""
    return _frame_text_similarity(clip, frames, prompt)


@register("appearance_style", group="semantic", needs={"frames", "prompt", "clip"})
def appearance_style(frames: np.ndarray, prompt: str, clip: ClipModel) -> float:
    """Return the cosine similarity of the style phrase (see style_phrase) with each frame, averaged."""
    return _frame_text_similarity(clip, frames, style_phrase(prompt))


def consistency_from_features(features: torch.Tensor) -> float:
    """Apply VBench's background_consistency formula to unit-norm frame features (F, D).

    For each frame t >= 1 it averages max(0, cos(f_t, f_0)) and max(0, cos(f_t, f_{t-1})),
    then returns the mean over those F - 1 frames. A single frame scores 1.0, as in VBench.
    """
    if features.shape[0] < 2:
        return 1.0
    to_first = (features[1:] @ features[0]).clamp(min=0.0)
    to_previous = (features[1:] * features[:-1]).sum(dim=-1).clamp(min=0.0)
    return float(((to_first + to_previous) / 2).mean())


@register("background_consistency", group="quality", needs={"frames", "clip"})
def background_consistency(frames: np.ndarray, clip: ClipModel) -> float:
    """Score how similar every frame's CLIP image feature stays to the first and the previous frame."""
    return consistency_from_features(clip.image_features(frames))


class AestheticModel:
    """LAION's aesthetic predictor: a linear head on unit-norm CLIP image features."""

    def __init__(self, clip: ClipModel, head: torch.nn.Linear):
        self.clip = clip
        self.head = head.double().eval()

    @torch.no_grad()
    def score(self, frames: np.ndarray) -> float:
        """Return the head's output on every frame divided by 10, averaged over frames."""
        return float(self.head(self.clip.image_features(frames)).mean()) / AESTHETIC_SCALE


def _load_head(path: Path) -> torch.nn.Linear:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or set(state) != {"weight", "bias"} or state["weight"].ndim != 2:
        keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(
            f"Invalid aesthetic head {path}: expected the state dict of one torch.nn.Linear "
            f"(keys 'weight' of shape (1, D) and 'bias'), got {keys}."
        )
    out_features, in_features = state["weight"].shape
    head = torch.nn.Linear(in_features, out_features)
    head.load_state_dict(state)
    return head


def load_aesthetic(options: Mapping[str, Any]) -> AestheticModel:
    """Load the aesthetic head file and its CLIP model from `options` (scoring.aesthetic).

    Raises ClipWeightsError when `head` is unset or not a file, and ValueError when the
    head's input size differs from the CLIP embedding size.
    """
    head_path = options.get("head")
    if not head_path or not Path(head_path).is_file():
        raise ClipWeightsError(
            f"aesthetic_quality needs LAION's linear aesthetic head for CLIP ViT-L/14, but scoring.aesthetic.head "
            f"is {head_path!r}, which is not a file. Download sa_0_4_vit_l_14_linear.pth from the LAION "
            "aesthetic-predictor repository on a machine with network access, copy it here and set "
            "scoring.aesthetic.head to its path, or remove aesthetic_quality from the scorers."
        )
    clip = load_clip(options)
    head = _load_head(Path(head_path))
    embed_dim = clip.image_features(np.zeros((1, 8, 8, 3), dtype=np.uint8)).shape[-1]
    if head.in_features != embed_dim:
        raise ValueError(
            f"Aesthetic head {head_path} expects {head.in_features}-dim features, but CLIP {clip.name!r} "
            f"gives {embed_dim}. Set scoring.aesthetic.model and pretrained to the CLIP the head was trained on "
            "(ViT-L-14, openai for LAION's head)."
        )
    return AestheticModel(clip, head)


register_resource("aesthetic", load_aesthetic)


@register("aesthetic_quality", group="quality", needs={"frames", "aesthetic"})
def aesthetic_quality(frames: np.ndarray, aesthetic: AestheticModel) -> float:
    """Return LAION's aesthetic prediction divided by 10, averaged over frames, as VBench does."""
    return aesthetic.score(frames)


def _absolute(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path and Path(path).exists() else path


def resource_options(scoring) -> dict[str, dict[str, Any]]:
    """Build load_resources options from params.scoring, with local paths made absolute.

    Absolute paths let Dask workers with another working folder find the weights.
    """
    options = {}
    for name in ("clip", "aesthetic"):
        section = getattr(scoring, name).model_dump()
        model = section["model"]
        if model.startswith(LOCAL_DIR_PREFIX):
            section["model"] = LOCAL_DIR_PREFIX + str(Path(model[len(LOCAL_DIR_PREFIX) :]).resolve())
        section["pretrained"] = _absolute(section.get("pretrained"))
        if "head" in section:
            section["head"] = _absolute(section["head"])
        options[name] = section
    return options
