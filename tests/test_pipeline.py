"""End to end: the real `dvc` CLI runs every stage on reduced params; outputs are checked."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import WanPipeline
from safetensors.torch import load_file

from pgdpo.video import read_video
from tests.conftest import run_cli

STAGES = ["prompts", "base", "generate", "reward_model", "score", "label", "train", "evaluate_base", "evaluate"]


def test_candidate_videos_decode(reproduced_project: Path):
    manifest = pd.read_csv(reproduced_project / "data/candidates/manifest.csv", keep_default_na=False)
    assert len(manifest) == 48 * 2  # 48 train prompts x 2 candidates
    frames = read_video(reproduced_project / "data/candidates" / manifest["path"].iloc[0])
    assert frames.shape == (5, 32, 32, 3)
    assert manifest["seed"].is_unique


def test_pairs_exist_with_margins(reproduced_project: Path):
    pairs = pd.read_csv(reproduced_project / "data/pairs/pairs.csv", keep_default_na=False)
    assert len(pairs) > 2
    assert (pairs["chosen_score"] >= pairs["rejected_score"]).all()
    np.testing.assert_allclose(pairs["margin"], pairs["chosen_score"] - pairs["rejected_score"], atol=1e-5)
    assert (pairs["split"] == "probe").sum() == 2
    latents = load_file(str(reproduced_project / "data/pairs/latents.safetensors"))
    assert latents["chosen"].shape[0] == len(pairs)
    assert latents["chosen"].shape == latents["rejected"].shape


def test_adapter_loads_with_load_lora_weights(reproduced_project: Path):
    pipe = WanPipeline.from_pretrained(reproduced_project / "data/base")
    hidden = torch.randn(1, 8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
    timestep = torch.tensor([500.0])
    with torch.no_grad():
        before = pipe.transformer(hidden, timestep, text, return_dict=False)[0]
        pipe.load_lora_weights(str(reproduced_project / "data/adapter"))
        after = pipe.transformer(hidden, timestep, text, return_dict=False)[0]
    assert pipe.get_list_adapters() != {}
    # Four optimizer steps moved the LoRA B matrices off zero, so the output must change.
    assert (after - before).abs().max().item() > 0


def test_metrics_are_finite(reproduced_project: Path):
    summary = json.loads((reproduced_project / "metrics/eval.json").read_text())
    assert set(summary) == {"base", "trained"}
    for model, block in summary.items():
        for dimension, entry in block.items():
            for key, value in entry.items():
                assert math.isfinite(value), f"{model}/{dimension}/{key} = {value}"
    assert 0.0 <= summary["base"]["oracle_alignment"]["mean"] <= 1.0
    assert (reproduced_project / "reports/contact_sheet.png").stat().st_size > 1000


def test_probe_file_has_rows(reproduced_project: Path):
    probe = pd.read_csv(reproduced_project / "plots/probe.tsv", sep="\t")
    assert probe["step"].tolist() == [0, 2, 4]
    assert np.isfinite(probe[["diff_chosen", "diff_rejected", "implicit_acc"]].to_numpy()).all()
    # The adapter starts as the reference, so the first probe shows no difference at all.
    assert probe.loc[0, "diff_chosen"] == 0.0


def test_mlflow_child_run_per_stage(reproduced_project: Path):
    mlflow.set_tracking_uri(f"sqlite:///{reproduced_project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["pgdpo"])
    parents = runs[runs["tags.mlflow.runName"] == "pipeline"]
    assert len(parents) == 1
    children = runs[runs["tags.mlflow.parentRunId"] == parents["run_id"].iloc[0]]
    assert sorted(children["tags.mlflow.runName"]) == sorted(STAGES)
    train = children[children["tags.mlflow.runName"] == "train"].iloc[0]
    assert train["params.train.method"] == "pgdpo"
    assert math.isfinite(train["metrics.train/loss"])


def test_second_repro_is_up_to_date(reproduced_project: Path):
    result = run_cli([sys.executable, "-m", "dvc", "repro"], reproduced_project)
    output = result.stdout + result.stderr
    assert "Running stage" not in output
    for stage in STAGES:
        assert f"'{stage}' didn't change" in output or "up to date" in output


def test_reward_model_and_clip_dimensions(reproduced_project: Path):
    retrieval = json.loads((reproduced_project / "metrics/reward_model.json").read_text())["retrieval"]
    assert 0.0 <= retrieval["held_out_top1"] <= 1.0
    assert (reproduced_project / "data/reward_model/open_clip_model.safetensors").is_file()
    summary = json.loads((reproduced_project / "metrics/eval.json").read_text())
    for dimension in ("clip_score", "background_consistency", "omni_total"):
        assert dimension in summary["trained"]
    assert 0.0 <= summary["base"]["background_consistency"]["mean"] <= 1.0
    scores = pd.read_csv(reproduced_project / "data/scores.csv", keep_default_na=False)
    assert {"clip_score", "background_consistency"} <= set(scores.columns)


def test_dimension_plots_render(reproduced_project: Path, tmp_path: Path):
    table = pd.read_csv(reproduced_project / "plots/eval_dimensions.tsv", sep="\t")
    assert {"dimension", "base", "trained", "trained_delta"} <= set(table.columns)
    assert "clip_score" in table["dimension"].tolist()
    run_cli([sys.executable, "-m", "dvc", "plots", "show", "-o", str(tmp_path / "plots")], reproduced_project)
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "eval_dimensions" in html
    assert "eval_dimension_deltas" in html

    # Only the plots of dvc.yaml's top-level section: no extra default plot per TSV output.
    plots_json = json.loads(run_cli([sys.executable, "-m", "dvc", "plots", "show", "--json"], reproduced_project).stdout)
    assert sorted(plots_json["data"]) == sorted(["likelihood_probe", "train_loss", "eval_dimensions", "eval_dimension_deltas"])
