"""Tests for pgdpo.suites on VBench's own suite files and on hostile prompt files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pgdpo.io import write_prompts
from pgdpo.naming import MAX_NAME_BYTES, prompt_from_filename, video_filename
from pgdpo.suites import load_eval_prompts, read_suite

ROOT = Path(__file__).resolve().parents[1]
# Unmodified copies of VBench's prompt files (Apache-2.0), kept next to the repository.
VBENCH = ROOT.parent / "shared" / "data" / "vbench"
PER_DIMENSION = sorted((VBENCH / "prompts_per_dimension").glob("*.txt"))


def plain_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_vbench_files_present():
    assert (VBENCH / "all_dimension.txt").is_file()
    assert (VBENCH / "VBench_full_info.json").is_file()
    assert len(PER_DIMENSION) == 11


def test_all_dimension_txt():
    suite = read_suite(VBENCH / "all_dimension.txt")
    lines = plain_lines(VBENCH / "all_dimension.txt")
    assert len(lines) == 946
    # Two prompts appear twice (an appearance_style prompt repeated for overall_consistency).
    assert len(suite.prompts) == 944
    assert suite.prompts == list(dict.fromkeys(lines))
    assert suite.prompts[0] == "In a still frame, a stop sign"
    assert any("façades" in prompt for prompt in suite.prompts)
    assert suite.dimensions == {}


@pytest.mark.parametrize("path", PER_DIMENSION, ids=lambda path: path.stem)
def test_per_dimension_file(path: Path):
    suite = read_suite(path)
    assert suite.prompts == list(dict.fromkeys(plain_lines(path)))
    assert len(suite.prompts) >= 70


def test_full_info_json():
    raw = json.loads((VBENCH / "VBench_full_info.json").read_text(encoding="utf-8"))
    suite = read_suite(VBENCH / "VBench_full_info.json")
    assert len(raw) == 946
    assert len(suite.prompts) == 944
    assert set(suite.prompts) == set(read_suite(VBENCH / "all_dimension.txt").prompts)
    assert suite.dimensions["In a still frame, a stop sign"] == ["temporal_flickering"]


def test_full_info_merges_duplicates():
    suite = read_suite(VBENCH / "VBench_full_info.json")
    prompt = "The bund Shanghai, oil painting"
    assert suite.prompts.count(prompt) == 1
    assert suite.dimensions[prompt] == ["appearance_style", "overall_consistency", "aesthetic_quality", "imaging_quality"]
    assert suite.auxiliary_info[prompt] == {"appearance_style": {"appearance_style": "oil painting"}}


def test_full_info_dimension_filter():
    raw = json.loads((VBENCH / "VBench_full_info.json").read_text(encoding="utf-8"))
    expected = list(dict.fromkeys(entry["prompt_en"] for entry in raw if "background_consistency" in entry["dimension"]))
    suite = read_suite(VBENCH / "VBench_full_info.json", ["background_consistency"])
    assert suite.prompts == expected
    assert len(suite.prompts) == 86
    assert set(suite.prompts) == set(read_suite(VBENCH / "prompts_per_dimension" / "scene.txt").prompts)


def test_full_info_unknown_dimension():
    with pytest.raises(ValueError, match="Unknown suite dimensions \\['oracle_color'\\]"):
        read_suite(VBENCH / "VBench_full_info.json", ["oracle_color", "color"])


def test_text_suite_rejects_dimensions():
    with pytest.raises(ValueError, match="without dimension tags"):
        read_suite(VBENCH / "all_dimension.txt", ["color"])


def test_vbench_names_unique_and_reversible():
    prompts = read_suite(VBENCH / "all_dimension.txt").prompts
    names = [video_filename(prompt, index) for prompt in prompts for index in range(5)]
    assert len(set(names)) == len(names)
    for prompt, name in zip((prompt for prompt in prompts for _ in range(5)), names):
        assert len(name.encode()) <= MAX_NAME_BYTES
        assert prompt_from_filename(name) in (prompt, None)
    # Short ASCII prompts keep VBench's exact `{prompt}-{index}.mp4` name.
    assert video_filename("In a still frame, a stop sign", 4) == "In a still frame, a stop sign-4.mp4"


def test_hostile_prompt_file(tmp_path):
    prompts = [
        "a/b\\c: what?*<>|",
        "100% %41 ~tilde",
        "  tabs\tinside and ünïcödé 🎬  ",
        ".hidden start",
        "x" * 600,
        "x" * 600 + "y",
        "a/b\\c: what?*<>|",
    ]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n\n", encoding="utf-8")
    suite = read_suite(path)
    assert suite.prompts == [
        "a/b\\c: what?*<>|", "100% %41 ~tilde", "tabs\tinside and ünïcödé 🎬", ".hidden start", "x" * 600, "x" * 600 + "y"
    ]
    names = [video_filename(prompt, index) for prompt in suite.prompts for index in range(5)]
    assert len(set(names)) == len(names)
    for name in names:
        assert "/" not in name and "\\" not in name
        assert not name.startswith(".")
        assert len(name.encode()) <= MAX_NAME_BYTES
    assert prompt_from_filename(video_filename("100% %41 ~tilde", 0)) == "100% %41 ~tilde"
    assert prompt_from_filename(video_filename("x" * 600, 0)) is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{}", "expected a JSON list"),
        ("[{\"dimension\": []}]", "expected an object with 'prompt_en'"),
        ("[{\"prompt_en\": \"ok\", \"dimension\": \"color\"}]", "Invalid 'dimension'"),
        ("[{\"prompt_en\": \"\\ud800\", \"dimension\": []}]", "lone surrogate"),
        ("[{\"prompt_en\": \"  \", \"dimension\": []}]", "expected non-empty text"),
        ("[", "not valid JSON"),
        ("[]", "contains no prompts"),
    ],
)
def test_invalid_json_suite(tmp_path, content, message):
    path = tmp_path / "suite.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_suite(path)


def test_empty_text_suite(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n   \n", encoding="utf-8")
    with pytest.raises(ValueError, match="contains no prompts"):
        read_suite(path)


def test_missing_suite(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluate.prompt_suite"):
        read_suite(tmp_path / "absent.txt")


def test_load_eval_prompts_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_prompts(Path("data/prompts/eval.txt"), ["a red circle moving left", "a red circle moving up"])
    assert load_eval_prompts(None, None) == ["a red circle moving left", "a red circle moving up"]
    with pytest.raises(ValueError, match="Set both or neither"):
        load_eval_prompts(None, ["color"])


def test_load_eval_prompts_suite():
    prompts = load_eval_prompts(str(VBENCH / "VBench_full_info.json"), ["color"])
    assert "a red bicycle" in prompts
    assert len(prompts) == 85
