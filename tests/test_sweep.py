"""The sweep flow queues DVC experiments, runs them with `dvc queue`, and compares them."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from flows.sweep import METRICS, best_experiment, grid_points, set_best_alias, sweep
from pgdpo.tracking import DVC_EXP_TAG
from tests.conftest import run_cli


def test_grid_points_cover_product():
    points = grid_points({"train.method": ["dpo", "pgdpo"], "train.seed": ["0", "1"]})
    assert points == [
        {"train.method": "dpo", "train.seed": "0"},
        {"train.method": "dpo", "train.seed": "1"},
        {"train.method": "pgdpo", "train.seed": "0"},
        {"train.method": "pgdpo", "train.seed": "1"},
    ]


@pytest.mark.slow
def test_sweep_runs_queued_experiments(reproduced_project: Path, tmp_path: Path, monkeypatch):
    project = tmp_path / "project"
    shutil.copytree(reproduced_project, project, symlinks=True)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(steps=2, probe_every=1)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # Experiments start from the last commit, so the outputs of the first run are committed.
    run_cli([sys.executable, "-m", "dvc", "repro", "train"], project)
    run_cli(["git", "add", "-A"], project)
    run_cli(["git", "commit", "-qm", "baseline"], project)
    # Without MLFLOW_TRACKING_URI, stages in DVC's temporary experiment copies log to the project's store.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{__import__('os').environ['PATH']}")

    with prefect_test_harness(server_startup_timeout=120):
        table = sweep({"train.method": ["dpo", "pgdpo"]}, project_dir=str(project), target="train")

    assert "| sweep-method-dpo | dpo |" in table
    assert "| sweep-method-pgdpo | pgdpo |" in table
    records = yaml.safe_load((project / "reports/sweep.json").read_text())
    assert [record["method"] for record in records] == ["dpo", "pgdpo"]
    # Two steps with probe_every=1 give probe rows at steps 0, 1 and 2.
    assert records[0]["probe"]["step"] == [0, 1, 2]
    assert (project / "reports/sweep_probe.png").stat().st_size > 1000

    # The alias `best` points at the model version that the best experiment's train stage registered.
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    best = client.get_model_version_by_alias("pgdpo-lora", "best")
    sweep_runs = client.search_runs([best_run_experiment(client)], filter_string="attributes.run_name = 'sweep'")
    assert sweep_runs, "the sweep logs a run named sweep"
    best_name = sweep_runs[0].data.tags["pgdpo.sweep.best"]
    assert best_name in {"sweep-method-dpo", "sweep-method-pgdpo"}
    assert client.get_run(best.run_id).data.tags.get(DVC_EXP_TAG) == best_name


def best_run_experiment(client: MlflowClient) -> str:
    return client.get_experiment_by_name("pgdpo").experiment_id


def sweep_record(name: str, method: str, reward: float) -> dict:
    return {"name": name, "method": method, "seed": 0, "metrics": {label: 0.0 for label in METRICS} | {"eval reward": reward}}


def test_best_experiment_by_metric():
    records = [sweep_record("sweep-a", "dpo", 0.2), sweep_record("sweep-b", "pgdpo", 0.5)]
    assert best_experiment(records, "eval reward") == "sweep-b"
    assert best_experiment(records, "eval reward", higher_is_better=False) == "sweep-a"
    with pytest.raises(ValueError, match="unknown sweep metric 'accuracy'"):
        best_experiment(records, "accuracy")


def test_best_alias_points_at_experiment_version(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("pgdpo")
    client.create_registered_model("pgdpo-lora")
    for name in ("sweep-a", "sweep-b", "sweep-a"):
        run = client.create_run(experiment_id, tags={DVC_EXP_TAG: name})
        client.create_model_version("pgdpo-lora", source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)

    assert set_best_alias(client, "pgdpo-lora", "sweep-a", "best") == "3"
    assert str(client.get_model_version_by_alias("pgdpo-lora", "best").version) == "3"
    assert set_best_alias(client, "pgdpo-lora", "sweep-missing", "best") is None
