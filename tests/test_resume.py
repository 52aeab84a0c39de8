"""Training killed with SIGKILL resumes from its last checkpoint and ends bit-identical."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.conftest import project_env, run_cli

ADAPTER_FILE = Path("data/adapter/pytorch_lora_weights.safetensors")


def test_killed_training_resumes_bit_identical(reproduced_project: Path, tmp_path: Path):
    project = tmp_path / "project"
    shutil.copytree(reproduced_project, project, symlinks=True)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(steps=40, checkpoint_every=10, probe_every=10, log_every=10)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    run_cli([sys.executable, "-m", "stages.train"], project)
    uninterrupted = (project / ADAPTER_FILE).read_bytes()
    assert not any((project / "checkpoints/train").glob("*/step-*")), "checkpoints are removed after a finished run"

    process = subprocess.Popen(
        [sys.executable, "-m", "stages.train"], cwd=project, env=project_env(project),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while not list((project / "checkpoints/train").glob("*/step-00000010")):
        assert process.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 600 s"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL

    checkpoints = sorted(p.name for p in (project / "checkpoints/train").glob("*/step-*"))
    assert checkpoints and checkpoints[0] == "step-00000010"

    result = run_cli([sys.executable, "-m", "stages.train"], project)
    assert "resumed training from" in result.stderr
    assert (project / ADAPTER_FILE).read_bytes() == uninterrupted
