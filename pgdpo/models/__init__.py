"""Model loading: pick the family adapter from a pipeline's `model_index.json`."""

from __future__ import annotations

import logging
from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline

from pgdpo.config import ParamsError
from pgdpo.models.adapter import VideoModelAdapter, VideoSpec, read_video_spec, write_video_spec
from pgdpo.models.compile import compile_denoiser
from pgdpo.models.families.animatediff import AnimateDiffAdapter
from pgdpo.models.families.cogvideox import CogVideoXAdapter
from pgdpo.models.families.hunyuan_video import HunyuanVideoAdapter
from pgdpo.models.families.ltx import LTXAdapter
from pgdpo.models.families.text_to_video_sd import TextToVideoSDAdapter
from pgdpo.models.families.wan import WanAdapter
from pgdpo.models.memory import MemoryOptions, place_pipeline
from pgdpo.runtime import resolve_dtype

logger = logging.getLogger(__name__)

ADAPTERS: dict[str, type[VideoModelAdapter]] = {
    cls.pipeline_class: cls
    for cls in (WanAdapter, TextToVideoSDAdapter, AnimateDiffAdapter, CogVideoXAdapter, LTXAdapter, HunyuanVideoAdapter)
}

__all__ = [
    "ADAPTERS", "InvalidVideoSpec", "MemoryOptions", "VideoModelAdapter", "VideoSpec", "load_adapter",
    "memory_options", "read_video_spec", "sampling_compile_mode", "video_overrides", "write_video_spec",
]


class InvalidVideoSpec(ParamsError):
    """Raised when a video size breaks the constraints of the pipeline's family."""

    def __init__(self, pipeline_class: str, problems: dict[str, str]):
        self.pipeline_class = pipeline_class
        self.problems = problems
        details = "; ".join(f"{field} = {problem}" for field, problem in problems.items())
        super().__init__(f"invalid video size for {pipeline_class} (set in base.video, or world for shapes): {details}")


def load_adapter(
    model: str | Path,
    device: torch.device,
    dtype: str = "float32",
    revision: str | None = None,
    variant: str | None = None,
    video: dict | None = None,
    memory: MemoryOptions | None = None,
    compile_mode: str | None = None,
) -> VideoModelAdapter:
    """Load a diffusers pipeline from a hub id or local folder and wrap it in its family adapter.

    Args:
        model: hub id (e.g. "Wan-AI/Wan2.1-T2V-1.3B-Diffusers") or path to a pipeline folder.
        device: where the pipeline runs.
        dtype: weight dtype name ("float32", "bfloat16", "float16").
        revision, variant: passed to `from_pretrained`.
        video: overrides of the video size and sampling defaults (see `VideoSpec`).
        memory: VAE slicing and tiling, CPU offload, releasing frozen modules (default: all off).
        compile_mode: torch.compile mode for the denoiser, or None to run it eagerly.

    Raises:
        ValueError: unsupported pipeline class, or video size unknown.
        InvalidVideoSpec (a ParamsError): a video size the family's VAE or denoiser cannot take.
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
    # Weights load from safetensors only, never from pickled .bin files, and a local folder
    # never triggers a hub lookup.
    pipe = getattr(diffusers, class_name).from_pretrained(
        str(model), dtype=torch_dtype, revision=revision, variant=variant,
        use_safetensors=True, local_files_only=Path(str(model)).is_dir(),
    )
    pipe.set_progress_bar_config(disable=True)

    local = Path(str(model))
    spec = read_video_spec(local if local.is_dir() else None, video)
    adapter = adapter_cls(pipe, spec, device, torch_dtype)
    problems = adapter.video_constraints().violations(spec)
    if problems:
        raise InvalidVideoSpec(class_name, problems)
    place_pipeline(pipe, adapter.denoiser, device, memory or MemoryOptions())
    if compile_mode is not None:
        compile_denoiser(adapter.denoiser, compile_mode)
    return adapter


def load_base(params, training: bool = False, device: torch.device | None = None) -> VideoModelAdapter:
    """Load the base model that `params.base` selects: the shapes-world base or `base.model`.

    The video size of `base.model` comes from `base.video` (over the folder's `pgdpo.json`).
    With `training=True`, model CPU offload is off, `train.offload_frozen` releases the
    text encoders and VAE, and `runtime.compile_sampling` does not apply (`train.compile` does,
    after the LoRA layers are added). `device` overrides `runtime.device` (one GPU per training process).

    Raises:
        ParamsError: the video size breaks the family's constraints, naming the params key.
    """
    from pgdpo.paths import BASE_MODEL
    from pgdpo.runtime import resolve_device

    shapes = params.base.model == "shapes"
    try:
        return load_adapter(
            BASE_MODEL if shapes else params.base.model,
            device=device or resolve_device(params.runtime.device),
            dtype=params.runtime.dtype,
            revision=None if shapes else params.base.revision,
            variant=None if shapes else params.base.variant,
            video=video_overrides(params),
            memory=memory_options(params, training),
            compile_mode=None if training else sampling_compile_mode(params),
        )
    except InvalidVideoSpec as error:
        section = "world" if shapes else "base.video"
        lines = [f"invalid video size for {error.pipeline_class} ({params.base.model}):"]
        lines += [f"  {section}.{field} = {problem}" for field, problem in error.problems.items()]
        raise ParamsError("\n".join(lines)) from None


def video_overrides(params) -> dict | None:
    """Return `base.video` as `load_adapter` overrides, or None for the shapes base (its size is in pgdpo.json)."""
    return None if params.base.model == "shapes" else params.base.video.model_dump()


def sampling_compile_mode(params) -> str | None:
    """Return the torch.compile mode of the sampling stages, or None when `runtime.compile_sampling` is off."""
    return params.runtime.compile_sampling_mode if params.runtime.compile_sampling else None


def memory_options(params, training: bool = False) -> MemoryOptions:
    """Return the memory options of `params.runtime`, and for training of `params.train`."""
    return MemoryOptions(
        vae_slicing=params.runtime.vae_slicing,
        vae_tiling=params.runtime.vae_tiling,
        cpu_offload=params.runtime.cpu_offload and not training,
        release_frozen=training and params.train.offload_frozen,
    )
