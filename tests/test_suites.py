"""Tests for pgdpo.suites on VBench's own suite files and on hostile prompt files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pgdpo.io import write_prompts
from pgdpo.naming import MAX_NAME_BYTES, prompt_from_filename, video_filename
from pgdpo.suites import load_eval_prompts, read_suite

ROOT = Path(__file__).resolve().parents[1]
# Unmodified copies of VBench's prompt files (Apache-2.0), kept next to the repository. Where they
# are absent (a checkout elsewhere), the tests run on a synthetic suite in the same layout.
SHARED_VBENCH = Path(os.environ.get("PGDPO_VBENCH_DIR", ROOT.parent / "shared" / "data" / "vbench"))

# (prompt_en, dimensions, auxiliary_info) of the synthetic suite; two prompts appear twice, as in VBench.
SYNTHETIC_ENTRIES = [
    ("a quiet harbor at dawn", ["temporal_flickering"], {}),
    ("a red bicycle", ["color"], {"color": {"color": "red"}}),
    ("a green apple on a wooden table", ["color"], {"color": {"color": "green"}}),
    ("a harbor, watercolor painting", ["appearance_style"], {"appearance_style": {"appearance_style": "watercolor painting"}}),
    ("a harbor, watercolor painting", ["overall_consistency", "aesthetic_quality"], {}),
    ("a train crossing a stone bridge", ["background_consistency"], {}),
    ("a forest path in autumn", ["background_consistency"], {}),
    ("old façades along a narrow street", ["aesthetic_quality"], {}),
    ("a dog jumping over a fence", ["dynamic_degree"], {}),
    ("a dog jumping over a fence", ["motion_smoothness"], {}),
]
SYNTHETIC_GROUPS = {
    "color": ["a red bicycle", "a green apple on a wooden table"],
    "scene": ["a train crossing a stone bridge", "a forest path in autumn"],
    "appearance_style": ["a harbor, watercolor painting"],
}

# Facts about each suite, checked against the parsed files.
KNOWN = {
    "vbench": {
        "lines": 946, "unique": 944, "groups": 11, "min_group_size": 70, "first": "In a still frame, a stop sign",
        "first_dimensions": ["temporal_flickering"], "duplicate": "The bund Shanghai, oil painting",
        "duplicate_dimensions": ["appearance_style", "overall_consistency", "aesthetic_quality", "imaging_quality"],
        "duplicate_info": {"appearance_style": {"appearance_style": "oil painting"}},
        "background_consistency": 86, "color": 85, "accented": "façades",
    },
    "synthetic": {
        "lines": 10, "unique": 8, "groups": 3, "min_group_size": 1, "first": "a quiet harbor at dawn",
        "first_dimensions": ["temporal_flickering"], "duplicate": "a harbor, watercolor painting",
        "duplicate_dimensions": ["appearance_style", "overall_consistency", "aesthetic_quality"],
        "duplicate_info": {"appearance_style": {"appearance_style": "watercolor painting"}},
        "background_consistency": 2, "color": 2, "accented": "façades",
    },
}


def write_synthetic_suite(folder: Path) -> Path:
    """Write a small suite in VBench's layout with prompts of our own."""
    (folder / "prompts_per_dimension").mkdir(parents=True)
    (folder / "all_dimension.txt").write_text("".join(f"{p}\n" for p, _, _ in SYNTHETIC_ENTRIES), encoding="utf-8")
    entries = [
        {"prompt_en": prompt, "dimension": dims, **({"auxiliary_info": info} if info else {})}
        for prompt, dims, info in SYNTHETIC_ENTRIES
    ]
    (folder / "VBench_full_info.json").write_text(json.dumps(entries, ensure_ascii=False, indent=1), encoding="utf-8")
    for group, prompts in SYNTHETIC_GROUPS.items():
        (folder / "prompts_per_dimension" / f"{group}.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory) -> tuple[Path, dict]:
    """The VBench copy when present, else the synthetic suite, with the facts known about it."""
    if (SHARED_VBENCH / "VBench_full_info.json").is_file():
        return SHARED_VBENCH, KNOWN["vbench"]
    return write_synthetic_suite(tmp_path_factory.mktemp("vbench")), KNOWN["synthetic"]


def plain_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_vbench_files_present(suite_dir):
    folder, known = suite_dir
    assert (folder / "all_dimension.txt").is_file()
    assert (folder / "VBench_full_info.json").is_file()
    assert len(list((folder / "prompts_per_dimension").glob("*.txt"))) == known["groups"]


def test_all_dimension_txt(suite_dir):
    folder, known = suite_dir
    suite = read_suite(folder / "all_dimension.txt")
    lines = plain_lines(folder / "all_dimension.txt")
    assert len(lines) == known["lines"]
    # Some prompts appear twice (for example an appearance_style prompt repeated for overall_consistency).
    assert len(suite.prompts) == known["unique"]
    assert suite.prompts == list(dict.fromkeys(lines))
    assert suite.prompts[0] == known["first"]
    assert any(known["accented"] in prompt for prompt in suite.prompts)
    assert suite.dimensions == {}


def test_per_dimension_files(suite_dir):
    folder, known = suite_dir
    for path in sorted((folder / "prompts_per_dimension").glob("*.txt")):
        suite = read_suite(path)
        assert suite.prompts == list(dict.fromkeys(plain_lines(path))), path.name
        assert len(suite.prompts) >= known["min_group_size"], path.name


def test_full_info_json(suite_dir):
    folder, known = suite_dir
    raw = json.loads((folder / "VBench_full_info.json").read_text(encoding="utf-8"))
    suite = read_suite(folder / "VBench_full_info.json")
    assert len(raw) == known["lines"]
    assert len(suite.prompts) == known["unique"]
    assert set(suite.prompts) == set(read_suite(folder / "all_dimension.txt").prompts)
    assert suite.dimensions[known["first"]] == known["first_dimensions"]


def test_full_info_merges_duplicates(suite_dir):
    folder, known = suite_dir
    suite = read_suite(folder / "VBench_full_info.json")
    prompt = known["duplicate"]
    assert suite.prompts.count(prompt) == 1
    assert suite.dimensions[prompt] == known["duplicate_dimensions"]
    assert suite.auxiliary_info[prompt] == known["duplicate_info"]


def test_full_info_dimension_filter(suite_dir):
    folder, known = suite_dir
    raw = json.loads((folder / "VBench_full_info.json").read_text(encoding="utf-8"))
    expected = list(dict.fromkeys(entry["prompt_en"] for entry in raw if "background_consistency" in entry["dimension"]))
    suite = read_suite(folder / "VBench_full_info.json", ["background_consistency"])
    assert suite.prompts == expected
    assert len(suite.prompts) == known["background_consistency"]
    assert set(suite.prompts) == set(read_suite(folder / "prompts_per_dimension" / "scene.txt").prompts)


def test_full_info_unknown_dimension(suite_dir):
    folder, _ = suite_dir
    with pytest.raises(ValueError, match="Unknown suite dimensions \\['oracle_color'\\]"):
        read_suite(folder / "VBench_full_info.json", ["oracle_color", "color"])


def test_text_suite_rejects_dimensions(suite_dir):
    folder, _ = suite_dir
    with pytest.raises(ValueError, match="without dimension tags"):
        read_suite(folder / "all_dimension.txt", ["color"])


def test_vbench_names_unique_and_reversible(suite_dir):
    folder, _ = suite_dir
    prompts = read_suite(folder / "all_dimension.txt").prompts
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


def test_text_suite_reads_written_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    write_prompts(path, ["a blue circle moving down", '"quoted" at the start'])
    with path.open("a", encoding="utf-8") as file:
        file.write('"a plain prompt starting with a quote\n')

    assert read_suite(path).prompts == [
        "a blue circle moving down", '"quoted" at the start', '"a plain prompt starting with a quote'
    ]


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


def test_load_eval_prompts_suite(suite_dir):
    folder, known = suite_dir
    prompts = load_eval_prompts(str(folder / "VBench_full_info.json"), ["color"])
    assert "a red bicycle" in prompts
    assert len(prompts) == known["color"]
