"""Candidate generation: K seeded clips per prompt, written as VBench-named MP4s plus a manifest.

With `shards > 1` the clip list is cut into shards that run as Prefect tasks on a Dask cluster
(`pgdpo.sharding`). The result is byte-identical to a one-shard run:
- seeds depend only on (prompt index, candidate index) in the full prompt list;
- shard boundaries fall on multiples of `batch_size`, so every clip is sampled in the same
  batch as in a one-shard run. This matters because batch composition changes the numbers: on
  CPU a clip sampled alone and the same clip sampled in a batch of 6 differed in 2 of 15,360
  uint8 values (tiny Wan pipeline, 2 steps);
- MP4 encoding is deterministic (`pgdpo.video`), and the driver writes files and manifest rows
  in clip order.
Workers run with `runtime.threads` torch threads, or one when it is 0.
NOTE: a one-shard run with 2 torch threads and 2 shards with 1 thread each gave identical
candidates on a 2-core CPU (reduced pipeline). Torch does not promise results independent of the
thread count, so the sharding test uses one thread on both sides.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pgdpo.io import atomic_dir, write_table
from pgdpo.models.adapter import VideoModelAdapter
from pgdpo.models.memory import MemoryOptions
from pgdpo.naming import video_filename
from pgdpo.sharding import ClusterSpec, run_shards, split_evenly
from pgdpo.video import file_sha256, write_mp4

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["prompt_id", "prompt", "index", "seed", "path", "sha256"]


@dataclass(frozen=True)
class ModelSource:
    """Model that a shard loads to sample: a pipeline folder or hub id, plus an optional LoRA adapter folder.

    Local paths are absolute, so a worker process with another working folder finds them.
    """

    model: str
    device: str = "cpu"
    dtype: str = "float32"
    revision: str | None = None
    variant: str | None = None
    lora: str | None = None
    threads: int = 0
    # base.video as (key, value) pairs, hashable like every other field; None for the shapes base.
    video: tuple[tuple[str, int | None], ...] | None = None
    memory: MemoryOptions = MemoryOptions()
    compile_mode: str | None = None

    @classmethod
    def from_params(cls, params, lora: str | os.PathLike | None = None) -> ModelSource:
        """Describe the base model that `params.base` selects, as `pgdpo.models.load_base` loads it."""
        from pgdpo.models import memory_options, sampling_compile_mode
        from pgdpo.paths import BASE_MODEL

        shapes = params.base.model == "shapes"
        model = BASE_MODEL if shapes else Path(params.base.model)
        return cls(
            model=str(model.resolve()) if shapes or model.exists() else params.base.model,
            device=params.runtime.device,
            dtype=params.runtime.dtype,
            revision=None if shapes else params.base.revision,
            variant=None if shapes else params.base.variant,
            lora=str(Path(lora).resolve()) if lora is not None else None,
            threads=params.runtime.threads,
            video=None if shapes else tuple(params.base.video.model_dump().items()),
            memory=memory_options(params),
            compile_mode=sampling_compile_mode(params),
        )

    def load(self) -> VideoModelAdapter:
        """Load the pipeline (and the LoRA adapter, if any) in this process."""
        from pgdpo.models import load_adapter
        from pgdpo.runtime import resolve_device

        adapter = load_adapter(
            self.model, device=resolve_device(self.device), dtype=self.dtype, revision=self.revision, variant=self.variant,
            video=dict(self.video) if self.video is not None else None, memory=self.memory,
            compile_mode=self.compile_mode,
        )
        if self.lora is not None:
            adapter.pipe.load_lora_weights(self.lora)
        return adapter


def candidate_seeds(num_prompts: int, num_candidates: int, base_seed: int) -> list[int]:
    """Return one seed per (prompt, candidate), row-major: prompt i, candidate k -> base + i*K + k."""
    return [base_seed + i * num_candidates + k for i in range(num_prompts) for k in range(num_candidates)]


def encode_clips(clips: np.ndarray, fps: int) -> list[bytes]:
    """Encode uint8 clips (N, F, H, W, 3) as MP4 files and return their bytes, in order."""
    encoded = []
    with tempfile.TemporaryDirectory(prefix="pgdpo-encode-") as folder:
        for n, clip in enumerate(clips):
            path = Path(folder) / f"{n}.mp4"
            write_mp4(path, clip, fps=fps)
            encoded.append(path.read_bytes())
    return encoded


def sample_shard(
    shard_index: int,
    source: ModelSource,
    prompts: list[str],
    seeds: list[int],
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int,
) -> list[bytes]:
    """Load the model in this process, sample one clip per (prompt, seed) and return the MP4 bytes.

    Runs on a Dask worker. The caller cuts shards at multiples of `batch_size`, so the batches
    here are the batches of a one-shard run.
    """
    import torch

    torch.set_num_threads(source.threads or 1)
    adapter = source.load()
    clips = adapter.generate(
        prompts, seeds, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        batch_size=batch_size, desc=f"shard {shard_index}",
    )
    return encode_clips(clips, adapter.spec.fps)


def sample_clips(
    model: VideoModelAdapter | ModelSource,
    prompts: list[str],
    seeds: list[int],
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int,
    cluster: ClusterSpec,
    desc: str,
) -> list[bytes]:
    """Return the MP4 bytes of one clip per (prompt, seed): in this process, or sharded on Dask."""
    if cluster.shards == 1:
        adapter = model.load() if isinstance(model, ModelSource) else model
        clips = adapter.generate(
            prompts, seeds, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            batch_size=batch_size, desc=desc,
        )
        return encode_clips(clips, adapter.spec.fps)

    if not isinstance(model, ModelSource):
        raise TypeError(
            f"sharded generation needs a ModelSource that each worker loads, got {type(model).__name__}; "
            "pass ModelSource.from_params(params) or set shards: 1"
        )
    ranges = split_evenly(len(prompts), cluster.shards, unit=batch_size)
    if len(ranges) < cluster.shards:
        logger.warning(
            "%s: %d clips make %d batch(es) of %d, so only %d of the %d requested shards run; "
            "lower batch_size for more shards",
            desc, len(prompts), len(ranges), batch_size, len(ranges), cluster.shards,
        )
    shard_args = [
        (index, model, prompts[start:stop], seeds[start:stop], num_inference_steps, guidance_scale, batch_size)
        for index, (start, stop) in enumerate(ranges)
    ]
    results = run_shards(sample_shard, shard_args, cluster, name=desc.replace(" ", "-"))
    return [clip for shard in results for clip in shard]


def generate_videos(
    model: VideoModelAdapter | ModelSource,
    prompts: list[str],
    num_per_prompt: int,
    base_seed: int,
    out_dir: Path,
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int,
    desc: str = "generate",
    cluster: ClusterSpec | None = None,
) -> pd.DataFrame:
    """Sample `num_per_prompt` clips for every prompt and write them under `out_dir/videos`.

    The folder is built in a temporary sibling and renamed into place, so a killed run leaves
    the previous folder or none. Paths in the manifest are relative to `out_dir`.

    Args:
        model: a loaded adapter, or a `ModelSource` (required when `cluster.shards > 1`).
        cluster: how to shard sampling; None runs one shard in this process.

    Returns:
        The manifest with columns prompt_id, prompt, index, seed, path, sha256.
    """
    if not prompts:
        raise ValueError("no prompts to generate for; the prompt list is empty")
    expanded = [prompt for prompt in prompts for _ in range(num_per_prompt)]
    seeds = candidate_seeds(len(prompts), num_per_prompt, base_seed)
    encoded = sample_clips(
        model, expanded, seeds, num_inference_steps, guidance_scale, batch_size, cluster or ClusterSpec(), desc
    )

    # A prompt listed twice keeps counting its file index (0..K-1, then K..2K-1), so every clip
    # gets its own `{prompt}-{index}.mp4` name, while `index` stays the candidate within its row.
    duplicates = len(prompts) - len(set(prompts))
    if duplicates:
        logger.warning("%d prompts appear more than once; their clips continue the file index", duplicates)
    file_indexes: Counter[str] = Counter()

    rows = []
    with atomic_dir(out_dir) as tmp:
        (tmp / "videos").mkdir()
        for n, (prompt, seed, data) in enumerate(tqdm(list(zip(expanded, seeds, encoded)), desc=f"{desc}: write mp4")):
            prompt_id, index = divmod(n, num_per_prompt)
            relative = Path("videos") / video_filename(prompt, file_indexes[prompt])
            file_indexes[prompt] += 1
            (tmp / relative).write_bytes(data)
            rows.append([prompt_id, prompt, index, seed, relative.as_posix(), file_sha256(tmp / relative)])
        manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        write_table(manifest, tmp / "manifest.csv")
    logger.info("wrote %d videos for %d prompts to %s", len(manifest), len(prompts), out_dir)
    return manifest
