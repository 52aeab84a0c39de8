"""The Prefect flow, run inside Prefect's test harness against a throwaway project copy."""

from __future__ import annotations

import mlflow
import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import StageFailed, pipeline, should_retry
from pgdpo.config import ParamsError
from pgdpo.stage import EXIT_INVALID_PARAMS
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
