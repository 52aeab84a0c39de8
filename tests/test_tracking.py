"""Stage behaviour when the MLflow tracking server is unreachable."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import make_project, project_env


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
