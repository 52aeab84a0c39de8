"""MLflow tracking of stages: unreachable servers, the tracking worker, and the DVC stage hash and checksums in run tags."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pgdpo.tracking import dvc_checksum, dvc_stage_entry, lock_fingerprint, owner_alive, tracking_uri
from pgdpo.tracking_worker import WorkerTracker, serve
from tests.conftest import make_project, project_env, run_cli


def closed_loopback_port() -> int:
    """Return a loopback port with no listener (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_prompts_stage(project: Path, uri: str) -> subprocess.CompletedProcess:
    env = project_env(project) | {"MLFLOW_TRACKING_URI": uri}
    return subprocess.run([sys.executable, "-m", "stages.prompts"], cwd=project, env=env, capture_output=True, text=True, timeout=300)


def test_unreachable_server_fails_stage(tmp_path):
    project = make_project(tmp_path)
    uri = f"http://127.0.0.1:{closed_loopback_port()}"
    result = run_prompts_stage(project, uri)
    assert result.returncode != 0
    assert uri in result.stderr
    assert "tracking.required: false" in result.stderr
    assert not (project / "data/prompts/train.txt").exists()


def test_optional_tracking_writes_outputs(tmp_path):
    project = make_project(tmp_path, overrides={"tracking": {"required": False}})
    uri = f"http://127.0.0.1:{closed_loopback_port()}"
    result = run_prompts_stage(project, uri)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("WARNING pgdpo.tracking") == 1
    assert uri in result.stderr
    assert len((project / "data/prompts/train.txt").read_text().splitlines()) == 48


LOCK_ENTRY = {
    "cmd": "python -m stages.train",
    "deps": [
        {"path": "data/pairs", "hash": "md5", "md5": "c4592c6e39a4288c497f66f3f0f1af74.dir", "size": 10, "nfiles": 3},
        {"path": "stages/train.py", "hash": "md5", "md5": "0d6fd33fbb7a86aa4488827bdb660dcf", "size": 5},
    ],
    "params": {"params.yaml": {"train": {"steps": 4}}},
    "outs": [{"path": "data/adapter", "md5": "ffff.dir"}],
}


def test_temp_experiment_uses_project_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workspace = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"
    workspace.mkdir(parents=True)
    project_store = f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking_uri(workspace) == project_store
    assert tracking_uri(tmp_path) == project_store
    monkeypatch.chdir(workspace)
    assert tracking_uri() == project_store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(workspace) == "http://127.0.0.1:5000"


def test_lock_fingerprint_ignores_order_and_outputs():
    reordered = LOCK_ENTRY | {"deps": LOCK_ENTRY["deps"][::-1], "outs": []}
    assert lock_fingerprint(reordered) == lock_fingerprint(LOCK_ENTRY)


def test_lock_fingerprint_follows_params():
    changed = LOCK_ENTRY | {"params": {"params.yaml": {"train": {"steps": 5}}}}
    assert lock_fingerprint(changed) != lock_fingerprint(LOCK_ENTRY)


def test_dvc_checksum_uses_folder_dep():
    assert dvc_checksum(LOCK_ENTRY, "data/pairs/pairs.csv") == "c4592c6e39a4288c497f66f3f0f1af74.dir"
    assert dvc_checksum(LOCK_ENTRY, "stages/train.py") == "0d6fd33fbb7a86aa4488827bdb660dcf"
    assert dvc_checksum(LOCK_ENTRY, "data/scores.csv") is None
    assert dvc_checksum(None, "data/pairs/pairs.csv") is None


def test_stage_entry_matches_dvc_lock(tmp_path):
    project = make_project(tmp_path)
    run_cli([sys.executable, "-m", "dvc", "repro", "prompts"], project)
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["prompts"]
    entry = dvc_stage_entry("prompts", project)
    assert lock_fingerprint(entry) == lock_fingerprint(lock)


def tracked_runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    return client.search_runs(experiments, filter_string="tags.`pgdpo.stage` != ''")


def serve_requests(requests: list[dict]) -> dict:
    """Run the tracking worker's loop in this process on `requests` and return its result."""
    results = []
    serve(io.StringIO("".join(json.dumps(request) + "\n" for request in requests)), results.append)
    assert len(results) == 1
    return results[0]


OPEN = {"call": "open", "args": {"stage": "demo", "experiment": "worker-test", "params": {"train": {"beta": 500}}, "required": True}}


def test_worker_replays_calls_into_one_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (tmp_path / "scores.csv").write_text("prompt,total\na red circle,0.5\n")
    result = serve_requests([
        OPEN,
        {"call": "log_metrics", "args": {"metrics": {"loss": 0.25}, "step": 3}},
        {"call": "set_tags", "args": {"tags": {"note": "replayed"}}},
        {"call": "log_artifact", "args": {"path": "scores.csv", "artifact_path": None}},
        {"call": "log_dataset", "args": {"path": "scores.csv", "name": "scores", "dvc_path": None, "context": "input"}},
        {"call": "end", "args": {"status": "FINISHED"}},
    ])
    assert result == {"error": None}
    (run,) = tracked_runs(uri)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"loss": 0.25}
    assert run.data.params == {"train.beta": "500"}
    assert run.data.tags["note"] == "replayed"
    assert [dataset.dataset.name for dataset in run.inputs.dataset_inputs] == ["scores"]


def test_worker_failed_call_fails_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = serve_requests([
        OPEN,
        {"call": "log_artifact", "args": {"path": "missing.csv", "artifact_path": None}},
        {"call": "log_metrics", "args": {"metrics": {"loss": 0.5}, "step": 0}},
        {"call": "end", "args": {"status": "FINISHED"}},
    ])
    assert result["error"].startswith("log_artifact:")
    (run,) = tracked_runs(uri)
    assert run.info.status == "FAILED"
    assert run.data.metrics == {"loss": 0.5}


def test_worker_fails_run_when_stage_dies(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = serve_requests([OPEN, {"call": "log_metrics", "args": {"metrics": {"loss": 1.0}, "step": 0}}])
    assert result == {"error": None}
    (run,) = tracked_runs(uri)
    assert run.info.status == "FAILED"


def test_owner_alive_cases():
    import socket

    import psutil

    current = psutil.Process()
    started = int(current.create_time() * 1000)
    host = socket.gethostname()
    assert owner_alive(f"{host}/{current.pid}-{started}") is True
    # Same pid, other start time: the pid now belongs to another process.
    assert owner_alive(f"{host}/{current.pid}-{started - 5000}") is False
    assert owner_alive(f"another-{host}/{current.pid}-{started}") is None
    assert owner_alive("not an owner") is None


def wait_for_run(uri: str, worker: subprocess.Popen, timeout_s: float = 120) -> object:
    """Return the one stage run in `uri` once `worker` has opened it, polling the store."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = tracked_runs(uri)
        if runs:
            return runs[0]
        assert worker.poll() is None, f"the tracking worker exited with {worker.returncode} before opening its run"
        time.sleep(0.2)
    raise AssertionError(f"no run appeared in {uri} within {timeout_s} s")


def test_killed_worker_run_marked_killed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # Create the store's tables first: two processes creating them at once can fail.
    assert tracked_runs(uri) == []
    worker = subprocess.Popen(
        [sys.executable, "-m", "pgdpo.tracking_worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    worker.stdin.write(json.dumps(OPEN) + "\n")
    worker.stdin.flush()
    orphan = wait_for_run(uri, worker)
    worker.kill()
    worker.wait(timeout=30)
    assert tracked_runs(uri)[0].info.status == "RUNNING", "a killed worker cannot end its run"

    result = serve_requests([OPEN, {"call": "end", "args": {"status": "FINISHED"}}])
    assert result == {"error": None}
    statuses = {run.info.run_id: run.info.status for run in tracked_runs(uri)}
    assert statuses.pop(orphan.info.run_id) == "KILLED"
    assert list(statuses.values()) == ["FINISHED"]


def test_worker_prepares_model_logging(tmp_path, monkeypatch, caplog):
    """`prepare` fills MLflow's map of installed packages before log_model needs it. A failed preparation only warns."""
    from mlflow.utils import requirements_utils

    import pgdpo.tracking_worker as worker

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    monkeypatch.setattr(requirements_utils, "_PACKAGES_TO_MODULES", None)
    prepare = {"call": "prepare", "args": {"calls": ["log_lora_model"]}}
    assert serve_requests([OPEN, prepare, {"call": "end", "args": {"status": "FINISHED"}}]) == {"error": None}
    assert "torch" in requirements_utils._PACKAGES_TO_MODULES

    def broken() -> None:
        raise OSError("disk full")

    monkeypatch.setitem(worker.PREPARATIONS, "log_lora_model", broken)
    assert serve_requests([OPEN, prepare, {"call": "end", "args": {"status": "FINISHED"}}]) == {"error": None}
    assert "preparing tracker call log_lora_model failed (disk full)" in caplog.text
    assert [run.info.status for run in tracked_runs(uri)] == ["FINISHED", "FINISHED"]


def test_worker_tracker_process_round_trip(tmp_path, monkeypatch):
    """A real worker process receives calls without the stage waiting, and close raises on a failed call."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    tracker = WorkerTracker("good", "worker-test", {"train": {"beta": 500}}, required=True)
    for step in range(5):
        tracker.log_metrics({"loss": torch.tensor(1.0 / (step + 1))}, step=step)
    with pytest.raises(ValueError, match=r"nothing to prepare for tracker calls \['log_video'\]"):
        tracker.prepare("log_video")
    tracker.close("FINISHED")

    failing = WorkerTracker("bad", "worker-test", {}, required=True)
    failing.log_artifact(tmp_path / "missing.csv")
    with pytest.raises(RuntimeError, match="stage bad failed in the tracking worker: log_artifact"):
        failing.close("FINISHED")

    runs = {run.data.tags["pgdpo.stage"]: run for run in tracked_runs(uri)}
    assert runs["good"].info.status == "FINISHED"
    assert runs["good"].data.metrics["loss"] == pytest.approx(0.2)
    assert runs["bad"].info.status == "FAILED"


def test_seeding_sets_deterministic_kernels_without_inductor():
    code = (
        "import sys, torch\n"
        "from pgdpo.runtime import seed_everything\n"
        "seed_everything(0)\n"
        "print(torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),"
        " 'torch._inductor' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.split() == ["True", "True", "False"]


def test_freeze_finalizes_garbage_first():
    """Garbage that exists when a stage ends is still finalized, and the live objects are frozen for the exit."""
    code = (
        "import gc\n"
        "from pgdpo.process import freeze_before_exit\n"
        "class Cycle:\n"
        "    def __del__(self):\n"
        "        print('finalized', flush=True)\n"
        "cycle = Cycle()\n"
        "cycle.self = cycle\n"
        "del cycle\n"
        "freeze_before_exit()\n"
        "print(gc.get_freeze_count() > 1000)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.split() == ["finalized", "True"]


def tracking_workers_in(project: Path) -> list[int]:
    """PIDs of tracking worker processes that run in `project`."""
    import psutil

    pids = []
    for process in psutil.process_iter(["cmdline", "cwd"]):
        if "pgdpo.tracking_worker" in (process.info["cmdline"] or []) and process.info["cwd"] == str(project):
            pids.append(process.pid)
    return pids


def test_stage_launcher_early_worker(tmp_path):
    """`python -m stages NAME` logs one finished run. Unknown names and invalid params leave no worker behind."""
    project = make_project(tmp_path / "project")
    uri = f"sqlite:///{project / 'mlflow.db'}"

    usage = run_cli([sys.executable, "-m", "stages", "prompt"], project, check=False)
    assert usage.returncode == 1
    assert "got 'prompt', expected one of: base, check, evaluate" in usage.stderr

    run_cli([sys.executable, "-m", "stages", "prompts"], project)
    (run,) = tracked_runs(uri)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["prompts/eval"] > 0
    assert (project / "data/prompts/train.txt").read_text().strip()

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["prompts"]["num_eval_combos"] = -3
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    invalid = run_cli([sys.executable, "-m", "stages", "prompts"], project, check=False)
    assert invalid.returncode == 78
    assert "prompts.num_eval_combos = -3" in invalid.stderr
    assert "Traceback" not in invalid.stderr
    assert tracking_workers_in(project) == []
    assert len(tracked_runs(uri)) == 1
