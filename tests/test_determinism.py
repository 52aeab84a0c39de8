"""Same inputs give the same bytes: `dvc repro -f` reproduces every stage output's checksum,
and a stage killed mid-write leaves its old outputs or none."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import project_env, run_cli


def output_checksums(project: Path) -> dict[str, str]:
    """Map every stage output in dvc.lock (cached or not) to its recorded md5."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    checksums = {}
    for stage, entry in lock["stages"].items():
        for out in entry.get("outs", []):
            checksums[f"{stage}:{out['path']}"] = out["md5"]
    return checksums


def copy_project(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination, symlinks=True)
    return destination


# A second full pipeline run (about 2 minutes here), so `make test-slow` runs it, not `make test`.
# It runs through the stage server, so it also checks that forked stages give the bytes of the
# new processes of the first run.
# NOTE: on 2026-12-05 this failed on `evaluate`'s outputs alone in 2 of 3 full forced runs (one
# plain, one through the server): 3 of 24 trained eval clips differed by up to 6 levels of 255.
# `dvc repro -f --single-item evaluate` gave the same bytes in 6 of 6 runs. In one run of
# `dvc repro -f --single-item generate label`, 5 of 96 candidate clips (one sampled batch, frames
# 0, 2 and 4) differed in the same way. Cause not found.
@pytest.mark.slow
def test_forced_repro_same_checksums(reproduced_project: Path, tmp_path: Path):
    project = copy_project(reproduced_project, tmp_path / "project")
    first = output_checksums(project)
    assert len(first) >= 12, f"expected every stage's outputs in dvc.lock, found {sorted(first)}"

    result = run_cli([sys.executable, "-m", "pgdpo.stage_server", sys.executable, "-m", "dvc", "repro", "-f"], project)
    assert result.stderr.count("runs `python -m stages ") == len(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    second = output_checksums(project)

    changed = sorted(key for key in first if first[key] != second.get(key))
    assert not changed, f"outputs differ after `dvc repro -f`: {changed}"
    assert second.keys() == first.keys()


def test_killed_stage_leaves_old_or_none(reproduced_project: Path, tmp_path: Path):
    project = copy_project(reproduced_project, tmp_path / "project")
    candidates = project / "data/candidates"
    old_manifest = (candidates / "manifest.csv").read_bytes()

    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "-f", "--single-item", "generate"], cwd=project,
        env=project_env(project), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    # DVC deletes a stage's outputs before it runs the command, so the folder vanishing marks the
    # start of generation; the kill then lands while clips are sampled.
    deadline = time.monotonic() + 600
    while candidates.exists():
        assert process.poll() is None, "dvc repro ended before it removed the old outputs"
        assert time.monotonic() < deadline, "generate did not start within 600 s"
        time.sleep(0.01)
    time.sleep(2.0)
    assert process.poll() is None, "generate finished within 2 s, so the kill would test nothing"
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL

    assert not candidates.exists(), "a killed generate left a folder at its output path"

    run_cli([sys.executable, "-m", "dvc", "repro"], project)
    assert (candidates / "manifest.csv").read_bytes() == old_manifest
    status = run_cli([sys.executable, "-m", "dvc", "status"], project)
    assert "up to date" in status.stdout


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from pgdpo.io import atomic_dir

target = Path(sys.argv[1])
with atomic_dir(target) as tmp:
    for index in range(5):
        (tmp / f"part-{index}.txt").write_text("new")
        if index == 2:
            os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkill_inside_atomic_dir_keeps_old(tmp_path: Path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "part-0.txt").write_text("old")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], env=env, capture_output=True)

    assert result.returncode == -signal.SIGKILL
    assert sorted(path.name for path in target.iterdir()) == ["part-0.txt"]
    assert (target / "part-0.txt").read_text() == "old"
    leftovers = [path.name for path in tmp_path.iterdir() if path.name.startswith(".tmp-out-")]
    assert len(leftovers) == 1, "the killed writer's temporary folder stays beside the output, unused"
