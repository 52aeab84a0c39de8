"""Smoke runs of the benchmark scripts in bench/: each runs as a subprocess with --smoke, and the
values in its JSON output are checked."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bench.common import MIB, PeakMemory, format_table, known_sections

ROOT = Path(__file__).resolve().parents[1]


def run_bench(name: str, tmp_path: Path, *options: str, timeout: float = 600) -> dict:
    """Run `python -m bench.<name> --smoke --out FILE` and return the JSON it wrote."""
    out = tmp_path / f"{name}.json"
    command = [sys.executable, "-m", f"bench.{name}", "--smoke", "--out", str(out), *options]
    # One torch thread: smoke sizes gain nothing from more, and on a busy machine spinning OpenMP
    # threads made the scaling smoke run several times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}\n{result.stderr[-6000:]}"
    assert "## " in result.stdout, "the benchmark printed no table"
    return json.loads(out.read_text())


def positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def test_peak_memory_sees_allocation():
    with PeakMemory(torch.device("cpu")) as memory:
        block = torch.ones(64 * MIB // 4)  # 64 MiB of float32, written so the pages are resident
        del block
    assert memory.increase >= 48 * MIB
    assert memory.peak >= memory.increase


def test_format_table_rows():
    table = format_table(["a", "b"], [[1, 0.123456], ["x", 2.0]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.1235 |", "| x | 2 |"]


def test_known_sections_drops_missing(tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"base": {"vae_steps": 1}}))
    assert known_sections({"base": {"vae_steps": 2}, "missing": {"x": 1}}, params) == {"base": {"vae_steps": 2}}


def test_train_step_smoke(tmp_path: Path):
    result = run_bench("train_step", tmp_path)
    entry = result["models"]["tiny_wan"]
    steps = entry["steps"]

    for path in ("baseline", "pgdpo"):
        assert positive(steps["times"][path]["median_s"]), path
        assert steps["times"][path]["n"] == result["sizes"]["reps"]
        assert all(positive(seconds) for seconds in steps["phases_median_s"][path].values()), path
        assert positive(entry["memory"][path]["peak_bytes"]), path
        assert len(steps["losses"][path]) == steps["steps_compared"]
    assert "encode_videos_prompts" in steps["phases_median_s"]["baseline"]
    assert "encode_videos_prompts" not in steps["phases_median_s"]["pgdpo"]

    # Same batches, noise and noise levels: the two paths must compute the same loss.
    assert steps["losses_match"]
    assert steps["loss_max_abs_diff"] <= steps["loss_tolerance"]["atol"] + steps["loss_tolerance"]["rtol"]
    assert all(math.isfinite(loss) for loss in steps["losses"]["pgdpo"])
    assert positive(steps["speedup_ratio_of_medians"])
    # The stock-kernel pgdpo path runs the baseline's kernels: its loss is the baseline's up to rounding.
    kernels = steps["kernels"]
    assert positive(kernels["baseline_over_stock_kernels"])
    assert positive(kernels["stock_kernels_over_pgdpo"])
    assert kernels["loss_max_abs_diff_vs_baseline"] <= steps["loss_tolerance"]["atol"]

    model_bytes = {path: entry["memory"][path]["model_bytes"] for path in ("baseline", "pgdpo")}
    assert "reference_copy" in model_bytes["baseline"]
    assert "reference_copy" not in model_bytes["pgdpo"]
    assert model_bytes["baseline"]["reference_copy"] > 0

    diagnostics = entry["diagnostics"]
    assert positive(diagnostics["probe_share_of_training"])
    assert diagnostics["probe_inference_mode_metrics_equal"]
    for name, cost in diagnostics["costs"].items():
        assert positive(cost["seconds_per_call"]), name
        assert math.isfinite(cost["share_of_step"]), name
        assert cost["share_of_step"] >= 0, name


def test_generation_smoke(tmp_path: Path):
    # About 30 s more with --compile: inductor compiles the batched and the one-clip graphs.
    result = run_bench("generation", tmp_path, "--compile")
    assert Path(result["inductor_cache_dir"]).is_dir()
    entry = result["models"]["tiny_wan"]
    assert entry["videos"] == entry["prompts"] * entry["candidates_per_prompt"]
    assert entry["batch_size"] > 1
    for mode in ("batched", "one_per_call", "batched_compiled", "one_per_call_compiled"):
        assert positive(entry["videos_per_second"][mode]), mode
    # Each clip has its own seeded generator, so batching must not change what is sampled.
    assert entry["outputs_equal_within_tolerance"]
    assert entry["max_uint8_diff"] <= entry["uint8_tolerance"]
    assert entry["equal_value_fraction"] > 0.999
    # Compiled kernels round differently but sample the same clips.
    for mode in ("batched_compiled", "one_per_call_compiled"):
        compiled = entry["compiled"][mode]
        assert compiled["outputs_equal_within_tolerance"], mode
        assert compiled["compile_s"] > 1, f"{mode}: the first call must hold the compilation"
        assert positive(compiled["speedup_over_eager_one_per_call"]), mode


def test_cpu_efficiency_smoke(tmp_path: Path):
    result = run_bench("cpu_efficiency", tmp_path)
    assert positive(result["matmul_peak"]["peak_flops"])
    paths = result["models"]["tiny_wan"]
    for path, entry in paths.items():
        assert positive(entry["flops_per_step"]), path
        assert positive(entry["achieved_flops"]), path
        assert positive(entry["fraction_of_peak"]), path
    # The baseline also runs the VAE encoder and the text encoder every step.
    assert paths["baseline"]["flops_per_step"] > paths["pgdpo"]["flops_per_step"]


def test_lora_forward_smoke(tmp_path: Path):
    result = run_bench("lora_forward", tmp_path)
    layers = result["layers"]
    assert [(e["width"], e["rank"]) for e in layers] == [(32, 8), (64, 8)]
    for entry in layers:
        for form in ("peft", "fused", "merged"):
            assert positive(entry["median_s"][form]), form
        # Same function in every form: outputs within float32 rounding of peft's.
        assert entry["max_rel_output_difference"]["fused"] < 1e-5
        assert entry["max_rel_output_difference"]["merged"] < 1e-5


def test_scaling_smoke(tmp_path: Path):
    result = run_bench("scaling", tmp_path)
    counts = result["prompt_counts"]
    runs = result["stage_runs"]
    assert {(run["stage"], run["prompts"]) for run in runs} == {(s, n) for s in result["stages"] for n in counts}
    for run in runs:
        assert positive(run["seconds"]), run
        assert positive(run["peak_rss_bytes"]), run
    for stage, growth in result["growth"].items():
        assert math.isfinite(growth["time_exponent"]), stage

    pairs = {(run["strategy"], run["prompts"]): run["pairs"] for run in result["pair_runs"]}
    for count in counts:
        assert pairs[("all_pairs", count)] > pairs[("best_vs_worst", count)]
    assert math.isfinite(result["train_vs_pairs"]["peak_rss_slope_kib_per_pair"])


@pytest.mark.slow
@pytest.mark.parametrize("stage_server", ["off", "on"])
def test_pipeline_overhead_smoke(tmp_path: Path, stage_server: str):
    result = run_bench("pipeline_overhead", tmp_path, "--stage-server", stage_server, timeout=1800)
    stages = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    # DVC runs the stages in a topological order, which need not be the file order.
    assert sorted(row["stage"] for row in result["stages"]) == sorted(stages)
    assert positive(result["stage_sum_s"])
    assert result["total_s"] > result["stage_sum_s"]
    assert 0 < result["overhead_fraction"] < 1
    assert positive(result["noop_s"])
    assert result["noop_stage_runs"] == 0
    if stage_server == "on":
        assert result["server"]["forked_stages"] == len(stages)
        assert result["server"]["forked_tracking_workers"] == len(stages)
        assert result["server"]["commands_run_alone"] == 0


def test_overhead_parses_worker_waits(tmp_path, monkeypatch, caplog):
    """The pipeline-overhead breakdown parses the line a stage logs when its tracking worker is done."""
    from bench.pipeline_overhead import logged_worker_waits
    from pgdpo.tracking_worker import WorkerTracker

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    caplog.set_level("INFO")
    WorkerTracker("label", "bench-test", {}, required=True).close("FINISHED")
    log = tmp_path / "repro.log"
    log.write_text(caplog.text)

    waits = logged_worker_waits(log)
    assert list(waits) == ["label"]
    assert 0 < waits["label"] < 120
