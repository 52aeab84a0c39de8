"""End to end with a diffusers pipeline folder as `base.model`: `dvc repro` on a tiny random Wan.

The folder has no pgdpo.json, so its video size comes from `base.video`. The clips of a
random-weight model show no shapes, so the reward and the reported dimensions are the
temporal scorers, which need no prompt grammar. Training also turns on gradient
accumulation and gradient checkpointing, and sampling turns on VAE slicing.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from diffusers import WanPipeline

from pgdpo.io import read_prompts
from pgdpo.stage import EXIT_INVALID_PARAMS
from pgdpo.video import read_video
from tests.conftest import SMALL_PARAMS, TINY_WAN_VIDEO, make_project, run_cli

TEMPORAL = ["temporal_flickering", "motion_smoothness"]
TRAIN_FILE = "data/prompt_files/train.txt"
# Any text is a valid prompt for a real model, so the train file mixes plain prompts with awkward ones.
TRAIN_PROMPTS = [
    "a cat walking on grass",
    "a cat walking on grass",
    "time-lapse of clouds, 100% \"real\"",
    "a/b ../c 🚀 rocket launch",
    "a dog running on the beach",
    "fireworks over a river at night",
    "waves crashing on rocks",
    "x" * 400,
]


@pytest.fixture(scope="module")
def wan_project(tiny_wan_folder: Path, tmp_path_factory) -> Path:
    project = make_project(
        tmp_path_factory.mktemp("wan-project"),
        {
            "runtime": {"vae_slicing": True},
            "prompts": {"train_file": TRAIN_FILE},
            "base": {"model": str(tiny_wan_folder), "video": TINY_WAN_VIDEO},
            "score": {"weights": {name: 1.0 for name in TEMPORAL}},
            "scoring": {"dimensions": TEMPORAL},
            # make_project replaces whole sections, so the reduced train settings are repeated here.
            "train": SMALL_PARAMS["train"] | {"grad_accum_steps": 2, "gradient_checkpointing": True},
        },
    )
    (project / TRAIN_FILE).write_text("\n".join(TRAIN_PROMPTS) + "\n", encoding="utf-8")
    run_cli([sys.executable, "-m", "dvc", "repro"], project)
    return project


def test_train_prompts_from_file(wan_project: Path):
    assert read_prompts(wan_project / "data/prompts/train.txt") == list(dict.fromkeys(TRAIN_PROMPTS))
    manifest = pd.read_csv(wan_project / "data/candidates/manifest.csv", keep_default_na=False)
    assert sorted(set(manifest["prompt"])) == sorted(set(TRAIN_PROMPTS))


def test_base_stage_records_external_model(wan_project: Path, tiny_wan_folder: Path):
    record = json.loads((wan_project / "data/base/external.json").read_text())
    assert record["model"] == str(tiny_wan_folder)
    assert not (wan_project / "data/base/model_index.json").exists()


def test_candidates_have_base_video_size(wan_project: Path):
    manifest = pd.read_csv(wan_project / "data/candidates/manifest.csv", keep_default_na=False)
    frames = read_video(wan_project / "data/candidates" / manifest["path"].iloc[0])
    assert frames.shape == (9, 32, 32, 3)


def test_scores_use_temporal_scorers_only(wan_project: Path):
    scores = pd.read_csv(wan_project / "data/scores.csv", keep_default_na=False)
    for name in TEMPORAL:
        assert scores[name].between(0, 1).all(), name
    assert not [column for column in scores.columns if column.startswith("oracle_")]


def test_adapter_loads_into_wan_folder(wan_project: Path, tiny_wan_folder: Path):
    pipe = WanPipeline.from_pretrained(tiny_wan_folder)
    pipe.load_lora_weights(str(wan_project / "data/adapter"))
    assert pipe.get_list_adapters() != {}
    hidden = torch.randn(1, 8, 5, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        output = pipe.transformer(hidden, torch.tensor([500.0]), text, return_dict=False)[0]
    assert torch.isfinite(output).all()


def test_eval_metrics_finite(wan_project: Path):
    summary = json.loads((wan_project / "metrics/eval.json").read_text())
    assert set(summary) == {"base", "trained"}
    for model, block in summary.items():
        assert set(TEMPORAL) <= set(block), model
        for dimension, entry in block.items():
            for key, value in entry.items():
                assert math.isfinite(value), f"{model}/{dimension}/{key} = {value}"


def test_train_metrics_from_accumulated_steps(wan_project: Path):
    log = pd.read_csv(wan_project / "plots/train.tsv", sep="\t")
    assert log["step"].tolist() == [1, 2, 3, 4]
    assert log["loss"].map(math.isfinite).all()


def test_mlflow_run_per_stage(wan_project: Path):
    mlflow.set_tracking_uri(f"sqlite:///{wan_project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["pgdpo"])
    stages = set(runs["tags.mlflow.runName"])
    assert {"prompts", "base", "generate", "score", "label", "train", "evaluate_base", "evaluate"} <= stages
    train = runs[runs["tags.mlflow.runName"] == "train"].iloc[0]
    assert train["params.train.grad_accum_steps"] == "2"
    assert train["params.base.video.num_frames"] == "9"


def test_invalid_video_size_exits_78(wan_project: Path, tmp_path: Path):
    project = tmp_path / "project"
    shutil.copytree(wan_project, project, symlinks=True)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["base"]["video"]["num_frames"] = 8
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    result = run_cli([sys.executable, "-m", "stages.generate"], project, check=False)

    assert result.returncode == EXIT_INVALID_PARAMS, result.stderr[-2000:]
    assert "base.video" in result.stderr
    assert "num_frames = 8" in result.stderr
    assert "Traceback" not in result.stderr
