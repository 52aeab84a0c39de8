"""The Prefect flow, run inside Prefect's test harness against a throwaway project copy."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pandas as pd
import pytest
import yaml
from prefect.artifacts import Artifact
from prefect.testing.utilities import prefect_test_harness

from flows.artifacts import pairs_description, pairs_summary_rows
from flows.pipeline import StageFailed, pipeline, should_retry, stage_exit_code, stage_timeout, stages_to_run
from pgdpo.config import ParamsError
from pgdpo.stage import EXIT_INVALID_PARAMS
from pgdpo.world import split_prompts
from tests.conftest import make_project


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_flow_runs_stage_under_parent_run(harness, tmp_path, monkeypatch):
    project = make_project(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")

    state = pipeline(str(project), stages=["prompts"], return_state=True)

    assert state.is_completed()
    parent_id = state.result()
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["pgdpo"])
    child = runs[runs["tags.mlflow.parentRunId"] == parent_id]
    assert child["tags.mlflow.runName"].tolist() == ["prompts"]
    assert runs.set_index("run_id").loc[parent_id, "status"] == "FINISHED"
    assert (project / "data/prompts/train.txt").read_text().count("\n") == 48

    # Nothing changed: `dvc status` skips the stage and no second parent run is opened.
    assert pipeline(str(project), stages=["prompts"]) is None
    assert len(mlflow.search_runs(experiment_names=["pgdpo"])) == len(runs)


def test_stages_to_run_from_first_change():
    order = ["prompts", "base", "generate", "score"]
    assert stages_to_run(order, set()) == []
    assert stages_to_run(order, {"generate"}) == ["generate", "score"]
    assert stages_to_run(order, {"base", "score"}) == ["base", "generate", "score"]
    assert stages_to_run(order, {"label"}) == []


def test_invalid_params_fail_flow_before_stages(harness, tmp_path, monkeypatch, caplog):
    project = make_project(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["prompts"]["num_eval_combos"] = -1
    (project / "params.yaml").write_text(yaml.safe_dump(params))

    with pytest.raises(ParamsError) as failure:
        pipeline(str(project), stages=["prompts"])

    assert "prompts.num_eval_combos = -1" in str(failure.value)
    assert "dvc repro" not in caplog.text
    assert not (project / "data/prompts").exists()


def test_retry_only_transient_failures():
    assert should_retry(StageFailed("train", returncode=1, tail="killed")) is True
    assert should_retry(OSError("disk busy")) is True
    assert should_retry(StageFailed("train", returncode=EXIT_INVALID_PARAMS, tail="invalid")) is False
    assert should_retry(ParamsError("train.lr = -1")) is False


def test_failing_stage_fails_flow_with_its_error(harness, tmp_path, monkeypatch, caplog):
    project = make_project(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    # A valid params file whose eval prompt list is missing: `evaluate_base` fails in the stage.
    with pytest.raises(StageFailed) as failure:
        pipeline(str(project), stages=["evaluate_base"])

    assert failure.value.stage == "evaluate_base"
    assert failure.value.returncode != 0
    assert "evaluate_base |" in caplog.text


# With the server, the stage's exit code reaches DVC through the command that handed it over.
@pytest.mark.parametrize("use_stage_server", [None, True], ids=["alone", "stage_server"])
def test_invalid_params_in_stage_not_retried(harness, tmp_path, monkeypatch, caplog, capfd, use_stage_server):
    project = make_project(tmp_path, {"prompts": {"train_file": "data/prompt_files/train.txt"}})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    # The schema accepts the file; the stage itself finds the eval prompt in it and exits 78.
    held_out = split_prompts(3, 0)[1][0]
    (project / "data/prompt_files/train.txt").write_text(f"a cat walking\n{held_out}\n", encoding="utf-8")

    with pytest.raises(StageFailed) as failure:
        pipeline(str(project), stages=["prompts"], use_stage_server=use_stage_server)

    assert failure.value.returncode == EXIT_INVALID_PARAMS
    assert caplog.text.count("running ") == 1
    # The server logs each process it forks to its stderr, which is this process's.
    forked = "runs `python -m stages prompts`" in capfd.readouterr().err
    assert forked == bool(use_stage_server)


def test_stage_exit_code_from_dvc_output():
    tail = ["ERROR: failed to reproduce 'prompts': failed to run: python -m stages prompts, exited with 78"]
    assert stage_exit_code(tail, 255) == EXIT_INVALID_PARAMS
    assert stage_exit_code(["ERROR: lock file is busy"], 255) == 255


@pytest.mark.parametrize("use_stage_server", [None, True], ids=["alone", "stage_server"])
def test_stage_timeout_stops_stage(harness, tmp_path, monkeypatch, caplog, use_stage_server):
    project = make_project(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")

    with pytest.raises(TimeoutError):
        pipeline(str(project), stages=["prompts"], stage_timeouts={"prompts": 1.0}, use_stage_server=use_stage_server)

    assert "stopping stage prompts" in caplog.text
    assert not (project / "data/prompts/train.txt").exists()


def test_timeouts_are_not_retried():
    assert should_retry(TimeoutError("stage ran past its timeout")) is False


def test_unknown_stage_names_rejected(harness, tmp_path, monkeypatch):
    project = make_project(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")

    with pytest.raises(ValueError, match=r"`stages`: unknown stages \['promts'\]") as failure:
        pipeline(str(project), stages=["promts"])
    assert "'prompts'" in str(failure.value)
    with pytest.raises(ValueError, match=r"`stage_timeouts`: unknown stages \['trian'\]"):
        pipeline(str(project), stages=["prompts"], stage_timeouts={"trian": 60.0})

    assert not (project / "data/prompts").exists()
    assert not (project / "mlflow.db").exists()


def test_missing_eval_suite_stops_flow(harness, tmp_path, monkeypatch):
    project = make_project(tmp_path, overrides={"evaluate": {"prompt_suite": "data/prompt_files/vbench.txt"}})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")

    with pytest.raises(ParamsError, match="evaluate.prompt_suite = 'data/prompt_files/vbench.txt'"):
        pipeline(str(project))

    assert not (project / "data/prompts").exists()
    assert not (project / "mlflow.db").exists()


def test_empty_stages_and_unselected_timeouts_rejected(harness, tmp_path, monkeypatch):
    project = make_project(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")

    with pytest.raises(ValueError, match="`stages`: the list is empty"):
        pipeline(str(project), stages=[])
    with pytest.raises(ValueError, match="stage_timeouts\\['train'\\] = -5"):
        pipeline(str(project), stages=["prompts"], stage_timeouts={"train": -5})

    assert not (project / "data/prompts").exists()


def test_flow_command_help():
    result = subprocess.run([sys.executable, "-m", "flows.pipeline", "--help"], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert "--stages" in result.stdout
    assert "--project-dir" in result.stdout


def test_stage_timeout_rejects_zero():
    with pytest.raises(ValueError, match="stage_timeouts\\['train'\\] = 0"):
        stage_timeout("train", {"train": 0})


def test_pipeline_publishes_report_artifact(harness, tmp_path, monkeypatch):
    project = make_project(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    parent_id = pipeline(str(project), stages=["prompts"])

    artifact = Artifact.get("pipeline-report")
    assert artifact is not None
    assert parent_id in artifact.data
    assert "| prompts |" in artifact.data
    assert "reports/eval.md was not written by this run" in artifact.data


def test_pairs_summary_counts_and_margins(tmp_path):
    pairs_dir = tmp_path / "data/pairs"
    pairs_dir.mkdir(parents=True)
    pd.DataFrame({
        "prompt": ["a", "a", "b", "c"],
        "margin": [0.1, 0.3, 0.5, 0.2],
        "split": ["train", "train", "train", "probe"],
    }).to_csv(pairs_dir / "pairs.csv", index=False)
    (pairs_dir / "summary.json").write_text('{"dropped_small_margin": 2, "pairs": 4}')

    rows = {row["split"]: row for row in pairs_summary_rows(tmp_path)}
    assert rows["train"]["pairs"] == 3
    assert rows["train"]["prompts"] == 2
    assert rows["train"]["margin_mean"] == 0.3
    assert rows["probe"]["margin_max"] == 0.2
    assert rows["all"]["pairs"] == 4
    assert "dropped_small_margin: 2" in pairs_description(tmp_path)
