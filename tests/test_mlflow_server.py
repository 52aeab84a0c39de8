"""The pipeline against a real `mlflow server` on 127.0.0.1: runs, tags, inputs, model and registry.

The server uses a sqlite backend and a proxied artifact root in a temporary folder; it is stopped
in teardown. One reduced `dvc repro` logs there, and the test reads everything back through
the MLflow client, then loads the registered LoRA as a pyfunc model and samples one clip.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pgdpo.process import stop_process
from pgdpo.tracking import STAGE_MD5_TAG, STAGE_TAG, lock_fingerprint
from pgdpo.video import read_video
from tests.conftest import make_project, project_env

pytestmark = pytest.mark.slow

MODEL_NAME = "pgdpo-lora-test"


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """Start `mlflow server` on 127.0.0.1 with sqlite and a temporary artifact root; yield its URI."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_loopback_port()
    uri = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
    ]
    log = (root / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=project_env(root), start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield uri
    finally:
        stop_process(server, grace_s=20)
        log.close()


@pytest.fixture(scope="module")
def tracked_project(mlflow_server, tmp_path_factory) -> Path:
    overrides = {"tracking": {"registered_model": MODEL_NAME, "max_logged_clips": 2}}
    project = make_project(tmp_path_factory.mktemp("tracked"), overrides=overrides)
    env = project_env(project) | {"MLFLOW_TRACKING_URI": mlflow_server}
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, capture_output=True, text=True, timeout=1800
    )
    assert result.returncode == 0, f"dvc repro failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return project


@pytest.fixture(scope="module")
def stage_runs(mlflow_server, tracked_project) -> dict:
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("pgdpo")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{STAGE_TAG}` != ''")
    return {run.data.tags[STAGE_TAG]: run for run in runs}


def lock_entries(project: Path) -> dict:
    return yaml.safe_load((project / "dvc.lock").read_text())["stages"]


def dep_md5(entry: dict, path: str) -> str:
    return next(dep["md5"] for dep in entry["deps"] if dep["path"] == path)


def test_every_stage_logged_with_lock_hash(tracked_project, stage_runs):
    lock = lock_entries(tracked_project)
    assert set(stage_runs) == set(lock)
    for stage, run in stage_runs.items():
        assert run.info.status == "FINISHED", stage
        assert run.data.tags["git.commit"] != "unknown", stage
        assert run.data.tags[STAGE_MD5_TAG] == lock_fingerprint(lock[stage]), stage
        assert run.data.tags["mlflow.parentRunId"], stage


def test_inputs_carry_dvc_checksums(tracked_project, stage_runs):
    lock = lock_entries(tracked_project)
    expected = {
        "generate": ("prompts", dep_md5(lock["generate"], "data/prompts/train.txt")),
        "score": ("manifest", dep_md5(lock["score"], "data/candidates")),
        "train": ("pairs", dep_md5(lock["train"], "data/pairs")),
    }
    for stage, (name, md5) in expected.items():
        inputs = {item.dataset.name: item.dataset for item in stage_runs[stage].inputs.dataset_inputs}
        assert name in inputs, f"{stage} logged inputs {list(inputs)}"
        assert inputs[name].digest == md5, stage


def test_eval_clips_logged_with_posters(mlflow_server, stage_runs):
    client = MlflowClient(mlflow_server)
    files = [item.path for item in client.list_artifacts(stage_runs["evaluate"].info.run_id, "videos/trained")]
    assert len([path for path in files if path.endswith(".mp4")]) == 2
    assert len([path for path in files if path.endswith(".png")]) == 2


def test_registered_model_predicts_clip(mlflow_server, tracked_project, stage_runs, tmp_path):
    client = MlflowClient(mlflow_server)
    (version,) = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert version.run_id == stage_runs["train"].info.run_id

    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/{version.version}")
    prompts = pd.DataFrame({"prompt": ["a red circle moving left"], "seed": [3]})
    output = model.predict(prompts, params={"num_inference_steps": 2, "output_dir": str(tmp_path)})

    assert list(output.columns) == ["prompt", "seed", "video_path"]
    frames = read_video(output.loc[0, "video_path"])
    params = yaml.safe_load((tracked_project / "params.yaml").read_text())
    assert frames.shape == (params["world"]["num_frames"], params["world"]["height"], params["world"]["width"], 3)

    # Without a seed column the rows get params["seed"] plus the row number.
    unseeded = model.predict(prompts[["prompt"]], params={"num_inference_steps": 2, "output_dir": str(tmp_path / "unseeded")})
    assert unseeded["seed"].tolist() == [0]
