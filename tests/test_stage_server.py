"""The stage server: forked commands behave like new processes, and DVC stages give the same bytes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pgdpo.stage_server import SERVER_ENV, Request, StageServer, environment_differences, stage_server
from tests.conftest import project_env, run_cli

# Reports what a new process would see, then exits with the code given as its argument, kills
# itself with SIGKILL, or sleeps until it is stopped.
PROBE = """
import os, signal, sys, time
print("args", sys.argv[1:])
print("cwd", os.getcwd())
print("preloaded mlflow", "mlflow" in sys.modules)
print("preloaded open_clip", "open_clip" in sys.modules)
print("variable", os.environ.get("PROBE_VARIABLE"))
print("marker", __import__("stages.marker").marker.VALUE)
print("to stderr", file=sys.stderr)
sys.stdout.flush()
action = sys.argv[1]
if action == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if action == "sleep":
    # Exits 3 on SIGTERM, so a test can tell a forwarded signal from a killed process.
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(3))
    with open("pid", "w") as pid_file:
        pid_file.write(str(os.getpid()))
    time.sleep(120)
sys.exit(int(action))
"""

# The command's side, as in stages/__main__.py: hand the probe over to the server, else run it here.
CLIENT = """
import runpy
from pgdpo.stage_server import hand_over
hand_over("probe")
print("ran in its own process")
runpy.run_module("probe", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server for a folder with a `stages` package, and the environment that points commands at it."""
    folder = tmp_path_factory.mktemp("served")
    (folder / "stages").mkdir()
    (folder / "stages/__init__.py").write_text("")
    (folder / "stages/marker.py").write_text("VALUE = 1\n")
    (folder / "probe.py").write_text(PROBE)
    env = {**project_env(folder), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with stage_server(folder, env) as variables:
        yield folder, {**env, **variables}


def run_client(folder: Path, env: dict[str, str], action: str, **kwargs) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", CLIENT, action]
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=120, **kwargs)


def start_client(folder: Path, env: dict[str, str], action: str) -> subprocess.Popen:
    command = [sys.executable, "-c", CLIENT, action]
    return subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_pid(folder: Path) -> int:
    deadline = time.monotonic() + 60
    while not (folder / "pid").exists() or not (folder / "pid").read_text():
        assert time.monotonic() < deadline, "the forked probe did not write its pid within 60 s"
        time.sleep(0.05)
    pid = int((folder / "pid").read_text())
    (folder / "pid").unlink()
    return pid


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_fork_runs_like_new_process(server):
    folder, env = server
    result = run_client(folder, {**env, "DVC_STAGE": "probe"}, "5")

    assert result.returncode == 5
    assert "args ['5']" in result.stdout
    assert f"cwd {folder}" in result.stdout
    assert "to stderr" in result.stderr
    assert "ran in its own process" not in result.stdout


def test_fork_starts_with_preloaded_modules(server):
    folder, env = server
    forked = run_client(folder, env, "0")
    alone = run_client(folder, {name: value for name, value in env.items() if name != SERVER_ENV}, "0")

    assert "preloaded mlflow True" in forked.stdout
    assert "preloaded open_clip True" in forked.stdout
    assert "preloaded mlflow False" in alone.stdout


def test_fork_imports_project_code_again(server):
    folder, env = server
    # The first request waits for the server's imports, which load the marker's first version.
    first = run_client(folder, env, "0")
    marker = folder / "stages/marker.py"
    marker.write_text("VALUE = 22222\n")
    try:
        result = run_client(folder, env, "0")
    finally:
        marker.write_text("VALUE = 1\n")

    assert "marker 1" in first.stdout
    assert "marker 22222" in result.stdout
    assert "ran in its own process" not in result.stdout


def test_signal_death_reaches_command(server):
    folder, env = server
    result = run_client(folder, env, "kill")

    assert result.returncode == -signal.SIGKILL
    assert "args ['kill']" in result.stdout


def test_sigterm_forwarded_to_fork(server):
    folder, env = server
    client = start_client(folder, env, "sleep")
    pid = wait_for_pid(folder)
    assert pid != client.pid

    client.send_signal(signal.SIGTERM)

    # The fork's own SIGTERM handler exits 3, and the command exits with the fork's status.
    assert client.wait(timeout=30) == 3
    assert gone_within(pid, 10)


def test_killed_command_kills_fork(server):
    folder, env = server
    client = start_client(folder, env, "sleep")
    pid = wait_for_pid(folder)

    client.kill()
    client.wait(timeout=30)

    assert gone_within(pid, 10), f"forked process {pid} still runs after its command was killed"


def test_different_environment_runs_alone(server):
    folder, env = server
    result = run_client(folder, {**env, "PROBE_VARIABLE": "set"}, "0")

    assert result.returncode == 0
    assert "ran in its own process" in result.stdout
    assert "environment variables differ from the server's: PROBE_VARIABLE" in result.stderr


def test_unreachable_server_runs_alone(server, tmp_path):
    folder, env = server
    result = run_client(folder, {**env, SERVER_ENV: str(tmp_path / "no-socket")}, "0")

    assert "ran in its own process" in result.stdout
    assert "is unreachable" in result.stderr


def test_runtime_variables_may_differ():
    server = {"PATH": "/bin", "OMP_NUM_THREADS": "1", "SHLVL": "1"}
    request = {"PATH": "/bin", "OMP_NUM_THREADS": "2", "SHLVL": "2", "DVC_STAGE": "train", "PGDPO_PARENT_RUN_ID": "x"}

    assert environment_differences(server, request) == ["OMP_NUM_THREADS"]


def test_fork_gets_import_changes(monkeypatch):
    monkeypatch.setenv("SET_BY_IMPORT", "1")
    monkeypatch.delenv("REMOVED_BY_IMPORT", raising=False)
    # The environment before the imports: without the first variable, with the second.
    started = {name: value for name, value in os.environ.items() if name != "SET_BY_IMPORT"}
    started["REMOVED_BY_IMPORT"] = "x"
    with socket.socket(socket.AF_UNIX) as listener:
        server = StageServer(listener, started)

    forked = server.fork_environment({**started, "DVC_STAGE": "train"})

    assert forked["SET_BY_IMPORT"] == "1"
    assert "REMOVED_BY_IMPORT" not in forked
    assert forked["DVC_STAGE"] == "train"
    # A fork's own command (a tracking worker) carries those changes and is still served.
    assert server.rejection(Request("pgdpo.tracking_worker", [], "/", forked, sys.executable, list(sys.flags))) is None


def lock_checksums(project: Path) -> dict[str, str]:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {f"{stage}:{out['path']}": out["md5"] for stage, entry in lock["stages"].items() for out in entry.get("outs", [])}


def test_dvc_stages_through_server_same_bytes(reproduced_project: Path, tmp_path: Path):
    project = Path(shutil.copytree(reproduced_project, tmp_path / "project", symlinks=True))
    before = lock_checksums(project)
    # `score` runs the CLIP reward model (open_clip), `label` the VAE and the text encoder. Sampling
    # stages are left to the slow full run, because a sampled batch differed now and then between
    # plain runs too (tests/test_determinism.py).
    stages = ["score", "label"]

    command = [sys.executable, "-m", "pgdpo.stage_server", sys.executable, "-m", "dvc", "repro", "-f", "--single-item", *stages]
    result = run_cli(command, project)

    for stage in stages:
        assert f"runs `python -m stages {stage}`" in result.stderr
    assert result.stderr.count("runs `python -m pgdpo.tracking_worker`") == len(stages)
    assert "rejected" not in result.stderr
    assert lock_checksums(project) == before
