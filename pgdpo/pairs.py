"""Build chosen/rejected pairs from scored candidates, and cache their latents for training."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pgdpo.models.adapter import VideoModelAdapter
from pgdpo.scoring.table import TOTAL
from pgdpo.video import read_video

logger = logging.getLogger(__name__)

PAIR_COLUMNS = [
    "pair_id", "prompt_id", "prompt", "chosen_path", "rejected_path", "chosen_seed", "rejected_seed",
    "chosen_score", "rejected_score", "margin", "split",
]


@dataclass
class PairStats:
    """Counts of what `build_pairs` kept and dropped."""

    prompts: int
    pairs: int
    dropped_small_margin: int
    dropped_tied: int
    dropped_non_finite: int = 0


def build_pairs(
    scores: pd.DataFrame, strategy: str, min_margin: float, num_probe_pairs: int, seed: int
) -> tuple[pd.DataFrame, PairStats]:
    """Turn per-clip total scores into chosen/rejected pairs.

    `best_vs_worst` pairs the highest- and lowest-scoring candidates of each prompt;
    `all_pairs` pairs every two candidates of a prompt. Pairs whose margin is below
    `min_margin` are dropped and counted (a prompt whose candidates all tie gives no pair).
    Candidates with a NaN or infinite total are dropped before pairing, counted and logged.
    `num_probe_pairs` pairs, drawn with `seed`, get split "probe" and are kept out of training.
    """
    finite = np.isfinite(pd.to_numeric(scores[TOTAL], errors="coerce").to_numpy(dtype=np.float64))
    dropped_non_finite = int((~finite).sum())
    if dropped_non_finite:
        bad = scores.loc[~finite, "path"].tolist()
        logger.warning(
            "dropped %d candidates whose %s score is NaN or infinite, for example %s",
            dropped_non_finite, TOTAL, bad[:3],
        )
        scores = scores.loc[finite]

    rows, dropped_small, dropped_tied = [], 0, 0
    for prompt_id, group in scores.groupby("prompt_id", sort=True):
        # Sort by score, then by candidate index so ties resolve the same way every run.
        group = group.sort_values([TOTAL, "index"], ascending=[False, True], kind="stable")
        records = group.to_dict("records")
        if strategy == "best_vs_worst":
            candidates = [(records[0], records[-1])]
        else:
            candidates = [(a, b) for i, a in enumerate(records) for b in records[i + 1 :]]
        for chosen, rejected in candidates:
            margin = chosen[TOTAL] - rejected[TOTAL]
            if margin == 0:
                dropped_tied += 1
                continue
            if margin < min_margin:
                dropped_small += 1
                continue
            rows.append({
                "prompt_id": int(prompt_id), "prompt": chosen["prompt"],
                "chosen_path": chosen["path"], "rejected_path": rejected["path"],
                "chosen_seed": int(chosen["seed"]), "rejected_seed": int(rejected["seed"]),
                "chosen_score": chosen[TOTAL], "rejected_score": rejected[TOTAL], "margin": margin,
            })

    pairs = pd.DataFrame(rows, columns=[c for c in PAIR_COLUMNS if c not in ("pair_id", "split")])
    pairs.insert(0, "pair_id", np.arange(len(pairs)))
    if len(pairs) <= num_probe_pairs:
        raise ValueError(
            f"only {len(pairs)} pairs survive label.min_margin={min_margin}, but label.num_probe_pairs="
            f"{num_probe_pairs} are held out for the probe; lower min_margin or num_probe_pairs, "
            "or generate more candidates"
        )
    probe = np.random.default_rng(seed).choice(len(pairs), size=num_probe_pairs, replace=False)
    pairs["split"] = "train"
    pairs.loc[np.sort(probe), "split"] = "probe"

    stats = PairStats(
        int(scores["prompt_id"].nunique()), len(pairs), dropped_small, dropped_tied, dropped_non_finite
    )
    logger.info(
        "built %d pairs from %d prompts; dropped %d under min_margin, %d tied and %d candidates "
        "with non-finite scores",
        stats.pairs, stats.prompts, stats.dropped_small_margin, stats.dropped_tied, stats.dropped_non_finite,
    )
    return pairs, stats


def cache_latents(
    adapter: VideoModelAdapter, pairs: pd.DataFrame, video_root: Path, out_file: Path, batch_size: int = 16
) -> None:
    """Encode every paired clip and the prompts once, and save them as safetensors.

    Keys: `chosen` and `rejected` latents (N, C, F, H, W), `prompt_embeds` (N, L, D), row i
    belonging to pair_id i, so training never decodes or re-encodes a video.
    """
    tensors: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": [], "prompt_embeds": []}
    spec = adapter.spec
    expected = (spec.num_frames, spec.height, spec.width)
    for start in tqdm(range(0, len(pairs), batch_size), desc="label: encode latents", unit="batch"):
        batch = pairs.iloc[start : start + batch_size]
        for role in ("chosen", "rejected"):
            frames = np.stack([read_video(Path(video_root) / p, expected_shape=expected) for p in batch[f"{role}_path"]])
            tensors[role].append(adapter.encode_videos(frames).float().cpu())
        tensors["prompt_embeds"].append(adapter.encode_prompts(batch["prompt"].tolist()).float().cpu())
    save_file({key: torch.cat(value).contiguous() for key, value in tensors.items()}, str(out_file))


def load_latents(path: Path) -> dict[str, torch.Tensor]:
    """Load the tensors written by `cache_latents`."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"latent cache {path} not found; run `dvc repro label` first")
    return load_file(str(path))


# Tensor dtypes a latent cache can hold, by their safetensors name.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
}


def _safetensors_entry(path: Path, key: str) -> tuple[torch.dtype, list[int], int]:
    """Return dtype, shape and absolute byte offset of tensor `key` in a safetensors file.

    The format is an 8-byte little-endian header length, a JSON header that gives each tensor's
    dtype, shape and byte range relative to the end of the header, then the raw data.
    """
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    if key not in header:
        stored = sorted(name for name in header if name != "__metadata__")
        raise KeyError(f"latent cache {path} has no tensor {key!r}, only {stored}; rerun `dvc repro label`")
    entry = header[key]
    if entry["dtype"] not in _SAFETENSORS_DTYPES:
        raise ValueError(
            f"latent cache {path}: tensor {key!r} has dtype {entry['dtype']}, which pgdpo cannot read; "
            "rerun `dvc repro label` to rewrite the cache"
        )
    return _SAFETENSORS_DTYPES[entry["dtype"]], list(entry["shape"]), 8 + header_len + entry["data_offsets"][0]


class LatentRows:
    """Rows of one tensor of a latent cache, read from the safetensors file when indexed.

    Training indexes a batch of rows per step, so only that batch is in memory, and memory does
    not grow with the number of cached pairs. Rows are read with `os.pread` into new buffers,
    not through a memory map, so the file's pages do not count in the process's resident memory.
    Indexing returns the same values as the tensor that `load_latents` returns.
    """

    def __init__(self, path: Path, key: str, rows: np.ndarray | None = None):
        if not Path(path).is_file():
            raise FileNotFoundError(f"latent cache {path} not found; run `dvc repro label` first")
        self.path = Path(path)
        self.key = key
        self.dtype, stored, self._offset = _safetensors_entry(self.path, key)
        self._row_shape = stored[1:]
        self._row_bytes = int(np.prod(self._row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.rows = np.arange(stored[0]) if rows is None else np.asarray(rows, dtype=np.int64)
        self.shape = torch.Size([len(self.rows), *self._row_shape])

    def view(self, rows: np.ndarray) -> LatentRows:
        """Return the rows `rows` of this view as a new view, reading nothing."""
        return LatentRows(self.path, self.key, self.rows[np.asarray(rows, dtype=np.int64)])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> torch.Tensor:
        positions = self.rows[np.asarray(index, dtype=np.int64).reshape(-1)]
        out = torch.empty((len(positions), *self._row_shape), dtype=self.dtype)
        buffer = out.view(torch.uint8).reshape(-1).numpy()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i, row in enumerate(positions):
                chunk = os.pread(fd, self._row_bytes, self._offset + int(row) * self._row_bytes)
                if len(chunk) != self._row_bytes:
                    raise ValueError(
                        f"latent cache {self.path} is truncated at row {row} of {self.key!r}; "
                        "rerun `dvc repro label`"
                    )
                buffer[i * self._row_bytes : (i + 1) * self._row_bytes] = np.frombuffer(chunk, dtype=np.uint8)
        finally:
            os.close(fd)
        return out


def open_latents(path: Path) -> dict[str, LatentRows]:
    """Open the tensors written by `cache_latents` without loading them; see `LatentRows`."""
    return {key: LatentRows(path, key) for key in ("chosen", "rejected", "prompt_embeds")}
