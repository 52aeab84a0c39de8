"""params.yaml validation: every invalid value is reported with its dotted key before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pgdpo.config import ParamsError, load_params
from pgdpo.stage import EXIT_INVALID_PARAMS

ROOT = Path(__file__).resolve().parents[1]


def write_params(tmp_path: Path, edit) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_default_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.train.method == "pgdpo"
    assert params.train.loss_config().ars.enabled


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["generate"].update(num_candidates=0), "generate.num_candidates = 0"),
        (lambda p: p["train"].update(method="ppo"), "train.method = 'ppo'"),
        (lambda p: p["train"].update(lr=-1.0), "train.lr = -1.0"),
        (lambda p: p["train"].update(unknown_key=1), "train.unknown_key"),
        (lambda p: p.update(extra_section={}), "extra_section"),
        (lambda p: p["train"]["loss"].update(beta=-5.0), "beta"),
        (lambda p: p["train"]["loss"]["ars"].update(k1=0.0), "k1"),
        (lambda p: p["train"]["loss"].update(bogus=1), "bogus"),
        (lambda p: p["world"].update(height=30), "world.height = 30"),
        (lambda p: p["score"].update(weights={"oracle_alignment": -1.0}), "score.weights"),
        (lambda p: p["prompts"].update(num_eval_combos=11), "prompts.num_eval_combos = 11"),
        (lambda p: p["train"].update(steps=0), "train.steps = 0"),
        (lambda p: p["world"].update(num_frames=4), "world.num_frames = 4 is not 1 + 2k"),
        (lambda p: p["score"].update(weights={"oracle_alinment": 1.0}), "unknown scorer names ['oracle_alinment']"),
        (lambda p: p["scoring"].update(dimensions=["clip_scor"]), "unknown scorer names ['clip_scor']"),
        (lambda p: p["runtime"].update(device="gpu"), "runtime.device = 'gpu'"),
        (lambda p: p["tracking"].update(experiment=""), "tracking.experiment = ''"),
    ],
)
def test_invalid_value_names_key(tmp_path, edit, message):
    path = write_params(tmp_path, edit)
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert message in str(error.value)


def test_misspelled_keys_get_suggestion(tmp_path):
    def misspell(params):
        params["trian"] = params.pop("train")
        params["generate"]["num_candiates"] = params["generate"].pop("num_candidates")

    with pytest.raises(ParamsError) as error:
        load_params(write_params(tmp_path, misspell))

    assert "trian: Extra inputs are not permitted" in str(error.value)
    assert "did you mean 'train'?" in str(error.value)
    assert "did you mean 'num_candidates'?" in str(error.value)


def test_duplicate_section_raises(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text() + "train:\n  steps: 3\n")

    with pytest.raises(ParamsError, match="duplicate key 'train'"):
        load_params(path)


def test_section_check_omits_section_value(tmp_path):
    path = write_params(tmp_path, lambda p: p["scoring"].update(quality_weight=0.0, semantic_weight=0.0))

    with pytest.raises(ParamsError) as error:
        load_params(path)

    assert "scoring.quality_weight + scoring.semantic_weight must be > 0" in str(error.value)
    assert "'dimensions'" not in str(error.value)


def test_missing_params_file_raises(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "absent.yaml")


def test_check_command_help():
    result = subprocess.run([sys.executable, "-m", "stages.check", "--help"], cwd=ROOT, capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    assert "params file" in result.stdout


def test_check_command_exit_codes(tmp_path):
    valid = subprocess.run([sys.executable, "-m", "stages.check", str(ROOT / "params.yaml")], cwd=ROOT, capture_output=True, text=True)
    assert valid.returncode == 0, valid.stderr
    invalid_path = write_params(tmp_path, lambda p: p["train"].update(steps=0))
    invalid = subprocess.run([sys.executable, "-m", "stages.check", str(invalid_path)], cwd=ROOT, capture_output=True, text=True)
    assert invalid.returncode == EXIT_INVALID_PARAMS
    assert "train.steps = 0" in invalid.stderr


def test_check_command_reads_prompt_files(tmp_path):
    (tmp_path / "train.txt").write_text("a red circle moving left\n")
    (tmp_path / "empty_suite.txt").write_text("\n")

    def name_files(params):
        params["prompts"]["train_file"] = "train.txt"
        params["evaluate"]["prompt_suite"] = "missing_suite.txt"

    path = write_params(tmp_path, name_files)
    missing = subprocess.run([sys.executable, "-m", "stages.check", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode == EXIT_INVALID_PARAMS
    assert "evaluate.prompt_suite = 'missing_suite.txt'" in missing.stderr
    assert "not found" in missing.stderr
    assert "prompts.train_file" not in missing.stderr

    path = write_params(tmp_path, lambda p: p["evaluate"].update(prompt_suite="empty_suite.txt"))
    empty = subprocess.run([sys.executable, "-m", "stages.check", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert empty.returncode == EXIT_INVALID_PARAMS
    assert "contains no prompts" in empty.stderr
