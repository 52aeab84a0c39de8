"""docs/reliability.md stays true to the tests: every test it names exists, and every
hostile-input test appears in it."""

from __future__ import annotations

import ast
import re

from tests.conftest import ROOT

DOC = ROOT / "docs" / "reliability.md"
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def defined_tests(path: str) -> set[str]:
    tree = ast.parse((ROOT / path).read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_named_tests_exist():
    references = REFERENCE.findall(DOC.read_text())
    assert len(references) >= 30
    missing = [f"{path}::{name}" for path, name in references if name not in defined_tests(path)]
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"


def test_hostile_input_tests_listed():
    listed = {name for path, name in REFERENCE.findall(DOC.read_text()) if path == "tests/test_hostile_inputs.py"}
    unlisted = sorted(defined_tests("tests/test_hostile_inputs.py") - listed)
    assert not unlisted, f"add these tests to docs/reliability.md: {unlisted}"
