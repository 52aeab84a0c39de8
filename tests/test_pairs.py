"""Pair building from scores: best vs worst, margins, ties and the probe split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from pgdpo.pairs import LatentRows, build_pairs, load_latents, open_latents


def scores_table(values_per_prompt: list[list[float]]) -> pd.DataFrame:
    rows = []
    for prompt_id, values in enumerate(values_per_prompt):
        for index, value in enumerate(values):
            rows.append({
                "prompt_id": prompt_id, "prompt": f"prompt {prompt_id}", "index": index,
                "seed": 100 * prompt_id + index, "path": f"videos/p{prompt_id}-{index}.mp4", "total": value,
            })
    return pd.DataFrame(rows)


def test_best_vs_worst_pairs():
    scores = scores_table([[0.2, 0.9, 0.5], [0.7, 0.1, 0.4], [0.3, 0.6, 0.6]])
    pairs, stats = build_pairs(scores, "best_vs_worst", min_margin=0.0, num_probe_pairs=1, seed=0)
    assert pairs["chosen_path"].tolist() == ["videos/p0-1.mp4", "videos/p1-0.mp4", "videos/p2-1.mp4"]
    assert pairs["rejected_path"].tolist() == ["videos/p0-0.mp4", "videos/p1-1.mp4", "videos/p2-0.mp4"]
    assert pairs["margin"].round(6).tolist() == [0.7, 0.6, 0.3]
    assert stats.pairs == 3
    assert (pairs["split"] == "probe").sum() == 1


def test_small_margins_and_ties_dropped_and_counted():
    scores = scores_table([[0.5, 0.5, 0.5], [0.50, 0.52], [0.1, 0.9], [0.2, 0.8]])
    pairs, stats = build_pairs(scores, "best_vs_worst", min_margin=0.05, num_probe_pairs=1, seed=0)
    assert pairs["prompt_id"].tolist() == [2, 3]
    assert stats.dropped_tied == 1
    assert stats.dropped_small_margin == 1


def test_all_pairs_strategy_counts():
    scores = scores_table([[0.1, 0.5, 0.9], [0.2, 0.4, 0.6]])
    pairs, _ = build_pairs(scores, "all_pairs", min_margin=0.0, num_probe_pairs=1, seed=0)
    assert len(pairs) == 6
    assert (pairs["chosen_score"] > pairs["rejected_score"]).all()


def test_too_few_pairs_for_probe_raises():
    scores = scores_table([[0.1, 0.9]])
    with pytest.raises(ValueError, match="num_probe_pairs"):
        build_pairs(scores, "best_vs_worst", min_margin=0.0, num_probe_pairs=1, seed=0)


def test_probe_split_is_seeded():
    scores = scores_table([[0.1, 0.2 + 0.01 * i] for i in range(10)])
    first, _ = build_pairs(scores, "best_vs_worst", 0.0, 3, seed=4)
    second, _ = build_pairs(scores, "best_vs_worst", 0.0, 3, seed=4)
    assert first["split"].tolist() == second["split"].tolist()


def test_latent_rows_match_loaded_tensors(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "chosen": torch.randn(10, 2, 3, 4, 4, generator=generator),
        "rejected": torch.randn(10, 2, 3, 4, 4, generator=generator),
        "prompt_embeds": torch.randn(10, 5, 6, generator=generator),
    }
    save_file(tensors, str(tmp_path / "latents.safetensors"))
    loaded = load_latents(tmp_path / "latents.safetensors")
    opened = open_latents(tmp_path / "latents.safetensors")

    rows = np.array([7, 2, 9, 3])
    batch = torch.tensor([3, 0, 0, 1])
    for key, lazy in opened.items():
        view = lazy.view(rows)
        assert view.shape == (4, *tensors[key].shape[1:])
        assert len(view) == 4
        assert torch.equal(view[batch], loaded[key][torch.as_tensor(rows)][batch])
        assert view[np.array([], dtype=np.int64)].shape == (0, *tensors[key].shape[1:])


def test_latent_rows_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro label"):
        open_latents(tmp_path / "absent.safetensors")


def test_latent_rows_resident_memory_flat(tmp_path):
    # 64 MiB of cached rows; reading each row once must not leave them resident, as a memory map would.
    rows, row_shape = 256, (4, 4, 32, 32)
    save_file({"chosen": torch.ones(rows, *row_shape, dtype=torch.float32)}, str(tmp_path / "big.safetensors"))
    chosen = LatentRows(tmp_path / "big.safetensors", "chosen")

    before = _rss_kib()
    total = 0.0
    for start in range(0, rows, 8):
        total += float(chosen[np.arange(start, start + 8)].sum())
    grown_mib = (_rss_kib() - before) / 1024

    assert total == rows * np.prod(row_shape)
    assert grown_mib < 12, f"resident memory grew by {grown_mib:.1f} MiB while reading a 64 MiB cache"


def test_latent_rows_bfloat16_and_truncated_file(tmp_path):
    values = torch.randn(6, 3, 5, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    path = tmp_path / "latents.safetensors"
    save_file({"prompt_embeds": values}, str(path))
    assert torch.equal(LatentRows(path, "prompt_embeds")[[5, 0]], values[[5, 0]])

    with pytest.raises(KeyError, match="no tensor 'chosen'"):
        LatentRows(path, "chosen")

    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated at row 5"):
        LatentRows(path, "prompt_embeds")[[5]]


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("VmRSS missing from /proc/self/status")
