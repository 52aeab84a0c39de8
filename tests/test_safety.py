"""Loading is safe: weights only from safetensors, `torch.load` only with weights_only=True,
no eval/exec/pickle on config values, and a stage writes nothing outside its project."""

from __future__ import annotations

import ast
import pickle
import sys
from pathlib import Path

import pytest
import torch

from pgdpo.models import load_adapter
from pgdpo.models.tiny_families import TINY_FAMILIES
from pgdpo.training.checkpoint import STATE_FILE, load_latest_checkpoint
from tests.conftest import ROOT, make_project, run_cli

SOURCE_FOLDERS = ("pgdpo", "stages", "flows")


def source_calls() -> list[tuple[Path, ast.Call]]:
    calls = []
    for folder in SOURCE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            calls.extend((path, node) for node in ast.walk(tree) if isinstance(node, ast.Call))
    return calls


def call_name(call: ast.Call) -> str:
    function = call.func
    if isinstance(function, ast.Name):
        return function.id
    if isinstance(function, ast.Attribute):
        owner = function.value.id if isinstance(function.value, ast.Name) else "?"
        return f"{owner}.{function.attr}"
    return ""


def keyword_value(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def test_torch_load_always_weights_only():
    loads = [(path, call) for path, call in source_calls() if call_name(call) == "torch.load"]
    assert loads, "expected the checkpoint loader to call torch.load"
    for path, call in loads:
        value = keyword_value(call, "weights_only")
        assert isinstance(value, ast.Constant) and value.value is True, f"{path}:{call.lineno} torch.load without weights_only=True"


def test_no_eval_exec_or_pickle():
    for path, call in source_calls():
        name = call_name(call)
        assert name not in {"eval", "exec", "compile", "pickle.load", "pickle.loads", "yaml.load"}, f"{path}:{call.lineno} calls {name}"
    for folder in SOURCE_FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
            assert "pickle" not in imported, f"{path} imports pickle"


def test_from_pretrained_requires_safetensors():
    calls = [(path, call) for path, call in source_calls() if call_name(call).endswith(".from_pretrained")]
    assert calls, "expected from_pretrained calls in the model loaders"
    for path, call in calls:
        value = keyword_value(call, "use_safetensors")
        assert isinstance(value, ast.Constant) and value.value is True, f"{path}:{call.lineno} from_pretrained without use_safetensors=True"


def test_pickled_weights_rejected(tmp_path: Path):
    family = TINY_FAMILIES["wan"]
    family.build(0).save_pretrained(tmp_path / "pipeline", safe_serialization=False)
    assert list((tmp_path / "pipeline").rglob("*.bin")), "expected pickled .bin weights in the saved folder"

    with pytest.raises(Exception, match="safetensors"):
        load_adapter(tmp_path / "pipeline", torch.device("cpu"), video=family.video)


class Payload:
    """A class that unpickling would import and run; weights_only loading must reject it."""

    def __reduce__(self):
        return (print, ("unpickled",))


def test_checkpoint_state_with_code_rejected(tmp_path: Path):
    checkpoint = tmp_path / "step-00000001"
    checkpoint.mkdir()
    torch.save({"step": 1, "payload": Payload()}, checkpoint / STATE_FILE)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_latest_checkpoint(tmp_path, model, optimizer, schedule, torch.Generator())


def test_stage_writes_only_inside_project(tmp_path: Path):
    project = make_project(tmp_path / "project")
    home = tmp_path / "home"
    home.mkdir()
    outside_before = sorted(path.name for path in tmp_path.iterdir())

    run_cli([sys.executable, "-m", "stages.prompts"], project, env_overrides={"HOME": str(home)})

    assert list(home.iterdir()) == [], f"the stage wrote into HOME: {sorted(p.name for p in home.rglob('*'))}"
    assert sorted(path.name for path in tmp_path.iterdir()) == outside_before
    assert (project / "data/prompts/train.txt").is_file()
