"""Model loading: pick the family adapter from a pipeline's `model_index.json`."""

from __future__ import annotations

import logging
from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline

from pgdpo.models.adapter import VideoModelAdapter, VideoSpec, read_video_spec, write_video_spec
from pgdpo.models.families.animatediff import AnimateDiffAdapter
from pgdpo.models.families.cogvideox import CogVideoXAdapter
from pgdpo.models.families.hunyuan_video import HunyuanVideoAdapter
from pgdpo.models.families.ltx import LTXAdapter
from pgdpo.models.families.text_to_video_sd import TextToVideoSDAdapter
from pgdpo.models.families.wan import WanAdapter
from pgdpo.runtime import resolve_dtype

logger = logging.getLogger(__name__)

ADAPTERS: dict[str, type[VideoModelAdapter]] = {
    cls.pipeline_class: cls
    for cls in (WanAdapter, TextToVideoSDAdapter, AnimateDiffAdapter, CogVideoXAdapter, LTXAdapter, HunyuanVideoAdapter)
}

__all__ = ["ADAPTERS", "VideoModelAdapter", "VideoSpec", "load_adapter", "read_video_spec", "write_video_spec"]


def load_adapter(
    model: str | Path,
    device: torch.device,
    dtype: str = "float32",
    revision: str | None = None,
    variant: str | None = None,
    video: dict | None = None,
) -> VideoModelAdapter:
    """Load a diffusers pipeline from a hub id or local folder and wrap it in its family adapter.

    Args:
        model: hub id (e.g. "Wan-AI/Wan2.1-T2V-1.3B-Diffusers") or path to a pipeline folder.
        device: where the pipeline runs.
        dtype: weight dtype name ("float32", "bfloat16", "float16").
        revision, variant: passed to `from_pretrained`.
        video: overrides of the video size and sampling defaults (see `VideoSpec`).
    """
    config = DiffusionPipeline.load_config(str(model), revision=revision)
    class_name = config.get("_class_name")
    if class_name not in ADAPTERS:
        raise ValueError(
            f"pipeline class {class_name!r} of model {model} is not supported; "
            f"supported pipeline classes: {sorted(ADAPTERS)}"
        )
    adapter_cls = ADAPTERS[class_name]
    torch_dtype = resolve_dtype(dtype)

    logger.info("loading %s pipeline from %s (dtype %s)", class_name, model, dtype)
    pipe = getattr(diffusers, class_name).from_pretrained(
        str(model), dtype=torch_dtype, revision=revision, variant=variant
    )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    local = Path(str(model))
    spec = read_video_spec(local if local.is_dir() else None, video)
    return adapter_cls(pipe, spec, device, torch_dtype)


def load_base(params) -> VideoModelAdapter:
    """Load the base model that `params.base` selects: the shapes-world base or `base.model`."""
    from pgdpo.paths import BASE_MODEL
    from pgdpo.runtime import resolve_device

    shapes = params.base.model == "shapes"
    return load_adapter(
        BASE_MODEL if shapes else params.base.model,
        device=resolve_device(params.runtime.device),
        dtype=params.runtime.dtype,
        revision=None if shapes else params.base.revision,
        variant=None if shapes else params.base.variant,
    )
