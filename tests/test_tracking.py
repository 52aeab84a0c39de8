"""MLflow tracking of stages: unreachable servers, and the DVC stage hash and checksums in run tags."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import yaml

from pgdpo.tracking import dvc_checksum, dvc_stage_entry, lock_fingerprint
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
