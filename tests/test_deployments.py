"""prefect.yaml: Prefect's own model accepts it, its entrypoints and schedules are valid, and `prefect deploy` registers it."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest
import yaml
from prefect import Flow
from prefect.client.schemas.schedules import CronSchedule
from prefect.flows import load_flow_from_entrypoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def deployment(config: dict, name: str) -> dict:
    return next(item for item in config["deployments"] if item["name"] == name)


def test_prefect_model_accepts_file(config):
    # The model `prefect deploy` validates prefect.yaml with (a private module of Prefect 3.9).
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(config)
    assert [item.name for item in model.deployments] == ["nightly", "method-grid"]
    assert all(item.work_pool.name == "pgdpo-process" for item in model.deployments)


@pytest.mark.parametrize("name", ["nightly", "method-grid"])
def test_entrypoint_loads_flow_with_parameters(config, name, monkeypatch):
    monkeypatch.chdir(ROOT)
    entry = deployment(config, name)
    flow = load_flow_from_entrypoint(entry["entrypoint"])
    assert isinstance(flow, Flow)
    accepted = set(inspect.signature(flow.fn).parameters)
    assert set(entry["parameters"]) <= accepted, f"unknown parameters {set(entry['parameters']) - accepted}"
    # Prefect's own type check of deployment parameters against the flow signature.
    flow.validate_parameters(dict(entry["parameters"]))


def test_pipeline_runs_nightly_on_cron(config):
    (schedule,) = deployment(config, "nightly")["schedules"]
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    assert cron.cron == "0 2 * * *"
    assert schedule["active"] is True


def test_sweep_metric_is_a_table_column(config):
    from flows.sweep import METRICS

    assert deployment(config, "method-grid")["parameters"]["metric"] in METRICS


# Starts a Prefect server (about 20 s here), so `make test-slow` runs it, not `make test`.
@pytest.mark.slow
def test_prefect_deploy_registers_deployments(tmp_path):
    """`prefect deploy --all` against a temporary Prefect server on 127.0.0.1 registers both deployments."""
    import shutil
    import subprocess
    import sys

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    for name in ("prefect.yaml", "flows", "pgdpo", "params.yaml"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, tmp_path / name)

    with prefect_test_harness(server_startup_timeout=120):
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PGDPO_PROJECT_DIR": str(tmp_path)}
        prefect = [sys.executable, "-m", "prefect"]
        for args in (["work-pool", "create", "pgdpo-process", "--type", "process"], ["--no-prompt", "deploy", "--all"]):
            result = subprocess.run(prefect + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

        with get_client(sync_client=True) as client:
            nightly = client.read_deployment_by_name("pgdpo-pipeline/nightly")
            grid = client.read_deployment_by_name("pgdpo-sweep/method-grid")

    assert [schedule.schedule.cron for schedule in nightly.schedules] == ["0 2 * * *"]
    assert nightly.work_pool_name == "pgdpo-process"
    assert nightly.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(tmp_path)}}
    ]
    assert grid.parameters["grid"] == {"train.method": ["dpo", "pgdpo"], "train.seed": ["0", "1", "2"]}
    assert grid.schedules == []
