"""Broken and hostile inputs: each gets a clear error or a counted, logged skip, and nothing
already written is lost. docs/reliability.md lists these cases next to the other guards."""

from __future__ import annotations

import logging
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import torch

from pgdpo.generation import generate_videos
from pgdpo.io import atomic_dir, read_prompts
from pgdpo.losses import LossConfig
from pgdpo.models import load_adapter
from pgdpo.models.tiny_families import TINY_FAMILIES
from pgdpo.naming import prompt_from_filename
from pgdpo.pairs import build_pairs, cache_latents
from pgdpo.stage import EXIT_INVALID_PARAMS
from pgdpo.training.checkpoint import checkpoint_dirs
from pgdpo.training.lora import add_lora
from pgdpo.training.trainer import PairData, TrainConfig, train_preference
from pgdpo.video import VideoReadError, read_video, write_mp4
from pgdpo.world import split_prompts
from tests.conftest import make_project, run_cli

CPU = torch.device("cpu")

AWKWARD_PROMPTS = [
    "a red circle moves left",
    "a red circle moves left",  # duplicate
    "left/right ../../etc/passwd",
    "..",
    "100% \"quoted\" 'text'",
    "first line\nsecond line",
    "a 🐱 chasing a 🚀",
    "x" * 1000,
]


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    """A tiny random Wan pipeline saved to disk and loaded through `load_adapter`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    family = TINY_FAMILIES["wan"]
    folder = tmp_path_factory.mktemp("tiny_wan")
    family.build(0).save_pretrained(folder)
    yield load_adapter(folder, CPU, video=family.video)
    torch.set_num_threads(threads)


def test_empty_prompt_file_rejected(tmp_path):
    for text in ("", "\n  \n\t\n"):
        path = tmp_path / "prompts.txt"
        path.write_text(text)
        with pytest.raises(ValueError, match="contains no prompts"):
            read_prompts(path)


def test_awkward_prompts_get_unique_files(tiny_wan, tmp_path):
    out = tmp_path / "candidates"
    manifest = generate_videos(
        tiny_wan, AWKWARD_PROMPTS, num_per_prompt=2, base_seed=0, out_dir=out,
        num_inference_steps=1, guidance_scale=1.0, batch_size=16,
    )
    files = sorted(path.name for path in (out / "videos").iterdir())
    assert len(files) == 2 * len(AWKWARD_PROMPTS)
    assert len(set(manifest["path"])) == len(manifest)
    assert all((out / path).resolve().parent == (out / "videos").resolve() for path in manifest["path"])
    assert all(len(name.encode()) <= 255 for name in files)
    # Names decode back to the prompt, except truncated long ones, whose exact prompt is in the manifest.
    for prompt, path in zip(manifest["prompt"], manifest["path"]):
        expected = None if len(prompt) == 1000 else prompt
        assert prompt_from_filename(Path(path).name) == expected
    assert manifest["prompt"].tolist()[-2:] == [AWKWARD_PROMPTS[-1]] * 2
    duplicate = manifest[manifest["prompt"] == AWKWARD_PROMPTS[0]]
    assert sorted(Path(path).name for path in duplicate["path"]) == [
        f"{AWKWARD_PROMPTS[0]}-{index}.mp4" for index in range(4)
    ]
    assert duplicate["index"].tolist() == [0, 1, 0, 1]


def write_variable_rate_mp4(path: Path, intervals_ms: list[int]) -> None:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, 1000)
        pts = 0
        for index, interval in enumerate(intervals_ms):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 30 * index, np.uint8), format="rgb24")
            frame.pts = pts
            frame.time_base = stream.time_base
            pts += interval
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def test_variable_frame_rate_read_in_order(tmp_path, caplog):
    path = tmp_path / "vfr.mp4"
    write_variable_rate_mp4(path, [33, 120] * 4)
    with caplog.at_level(logging.WARNING, logger="pgdpo.video"):
        frames = read_video(path)
    assert frames.shape == (8, 32, 32, 3)
    assert np.all(np.diff(frames[:, 0, 0, 0].astype(int)) > 20)
    assert "variable frame rate" in caplog.text


def test_constant_frame_rate_no_warning(tmp_path, caplog):
    path = tmp_path / "cfr.mp4"
    write_mp4(path, np.zeros((6, 32, 32, 3), np.uint8))
    with caplog.at_level(logging.WARNING, logger="pgdpo.video"):
        read_video(path)
    assert "variable frame rate" not in caplog.text


def test_wrong_frame_count_rejected(tmp_path):
    path = tmp_path / "short.mp4"
    write_mp4(path, np.zeros((3, 32, 32, 3), np.uint8))
    with pytest.raises(VideoReadError, match=r"expected \(9, 32, 32\)"):
        read_video(path, expected_shape=(9, 32, 32))


def scores_with_nan() -> pd.DataFrame:
    totals = [[0.1, float("nan"), 0.9], [0.2, 0.8, float("inf")], [0.3, 0.7, 0.5]]
    rows = [
        {"prompt_id": p, "prompt": f"prompt {p}", "index": i, "seed": i, "path": f"videos/p{p}-{i}.mp4", "total": value}
        for p, values in enumerate(totals)
        for i, value in enumerate(values)
    ]
    return pd.DataFrame(rows)


def test_nan_scores_dropped_and_counted(caplog):
    with caplog.at_level(logging.WARNING, logger="pgdpo.pairs"):
        pairs, stats = build_pairs(scores_with_nan(), "best_vs_worst", min_margin=0.0, num_probe_pairs=1, seed=0)
    assert stats.dropped_non_finite == 2
    assert np.isfinite(pairs["margin"]).all()
    assert pairs["chosen_path"].tolist() == ["videos/p0-2.mp4", "videos/p1-1.mp4", "videos/p2-1.mp4"]
    assert "videos/p0-1.mp4" in caplog.text


def test_missing_video_keeps_old_pairs(tiny_wan, tmp_path):
    pairs_dir = tmp_path / "pairs"
    pairs_dir.mkdir()
    (pairs_dir / "pairs.csv").write_text("old pairs\n")
    pairs = pd.DataFrame({"prompt": ["a red circle"], "chosen_path": ["videos/gone.mp4"], "rejected_path": ["videos/gone.mp4"]})

    with pytest.raises(VideoReadError, match="gone.mp4"):
        with atomic_dir(pairs_dir) as tmp:
            (tmp / "pairs.csv").write_text("new pairs\n")
            cache_latents(tiny_wan, pairs, tmp_path, tmp / "latents.safetensors")

    assert (pairs_dir / "pairs.csv").read_text() == "old pairs\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pairs"]


def test_non_finite_loss_stops_and_keeps_checkpoint(tiny_wan, tmp_path):
    spec = tiny_wan.spec
    generator = torch.Generator().manual_seed(0)
    latents = tiny_wan.encode_videos(
        torch.randint(0, 255, (4, spec.num_frames, spec.height, spec.width, 3), generator=generator, dtype=torch.uint8).numpy()
    ).float()
    embeds = tiny_wan.encode_prompts(["a red circle"] * 2).float()
    good = PairData(
        chosen=latents[:2], rejected=latents[2:], prompt_embeds=embeds,
        score_w=torch.tensor([1.0, 1.0]), score_l=torch.tensor([0.0, 0.0]), pair_ids=np.array([10, 11]),
    )
    poisoned = PairData(
        chosen=torch.full_like(good.chosen, float("nan")), rejected=good.rejected, prompt_embeds=embeds,
        score_w=good.score_w, score_l=good.score_l, pair_ids=good.pair_ids,
    )
    add_lora(tiny_wan, rank=2, alpha=2.0, dropout=0.0, targets=None, seed=0)
    checkpoints = tmp_path / "checkpoints"

    def config(steps: int) -> TrainConfig:
        return TrainConfig(method="pgdpo", loss=LossConfig(), steps=steps, batch_size=2, lr=1e-3, probe_every=100, log_every=1)

    train_preference(tiny_wan, good, good, config(2), checkpoint_dir=checkpoints, checkpoint_every=1)
    assert [path.name for path in checkpoint_dirs(checkpoints)] == ["step-00000001"]

    # The resumed run starts at step 2 and meets NaN latents there.
    with pytest.raises(FloatingPointError, match=r"at step 2, pair ids \[1[01], 1[01]\]"):
        train_preference(tiny_wan, poisoned, good, config(4), checkpoint_dir=checkpoints, checkpoint_every=1)
    assert [path.name for path in checkpoint_dirs(checkpoints)] == ["step-00000001"]


def test_train_file_with_eval_prompt_rejected(tmp_path):
    project = make_project(tmp_path / "project", {"prompts": {"train_file": "data/prompt_files/train.txt"}})
    held_out = split_prompts(3, 0)[1]
    (project / "data/prompt_files/train.txt").write_text(f"a cat walking\n{held_out[0]}\n", encoding="utf-8")

    result = run_cli([sys.executable, "-m", "stages.prompts"], project, check=False)

    assert result.returncode == EXIT_INVALID_PARAMS, result.stderr[-2000:]
    assert "prompts.train_file" in result.stderr
    assert held_out[0] in result.stderr
    assert not (project / "data/prompts").exists()
