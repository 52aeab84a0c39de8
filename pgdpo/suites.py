"""Prompt suites for evaluation: plain prompt files and VBench's suite files.

Accepted formats, chosen by the file suffix:
- `.json`: VBench_full_info.json, a list of objects with `prompt_en` (str), `dimension`
  (list of VBench dimension names) and optionally `auxiliary_info`;
- any other suffix: plain UTF-8 text with one prompt per line, as VBench's
  all_dimension.txt and prompts_per_dimension/*.txt. Surrounding whitespace is
  stripped and blank lines are skipped; every other character is kept.

A prompt that occurs more than once is kept once, at its first position, with the
union of its dimensions, because VBench names clips `{prompt}-{index}.mp4` and two
copies of a prompt would write the same files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from pgdpo.config import ParamsError
from pgdpo.io import parse_prompt_line, read_prompts
from pgdpo.paths import EVAL_PROMPTS

logger = logging.getLogger(__name__)

DIMENSIONS_WITHOUT_SUITE = "evaluate.suite_dimensions is set, but evaluate.prompt_suite is null. Set both or neither."


@dataclass
class PromptSuite:
    """Unique prompts in file order, with the VBench dimensions and auxiliary info of each (JSON suites only)."""

    prompts: list[str]
    dimensions: dict[str, list[str]] = field(default_factory=dict)
    auxiliary_info: dict[str, dict] = field(default_factory=dict)


def _check_prompt(prompt: object, where: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"Invalid prompt {prompt!r} at {where}: expected non-empty text.")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"Invalid prompt {prompt!r} at {where}: it contains a lone surrogate ({error}).") from error
    return prompt


def _read_text_suite(path: Path) -> PromptSuite:
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            prompts.append(_check_prompt(parse_prompt_line(line.strip()), f"{path}:{number}"))
    unique = list(dict.fromkeys(prompts))
    if len(unique) < len(prompts):
        logger.warning("%s lists %d prompts more than once; each is kept once", path, len(prompts) - len(unique))
    return PromptSuite(unique)


def _read_json_suite(path: Path) -> PromptSuite:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"Invalid prompt suite {path}: not valid JSON ({error}).") from error
    if not isinstance(entries, list):
        raise ValueError(
            f"Invalid prompt suite {path}: expected a JSON list of objects with 'prompt_en' and 'dimension' "
            f"(VBench_full_info.json), got {type(entries).__name__}."
        )

    suite = PromptSuite([])
    for index, entry in enumerate(entries):
        where = f"{path} entry {index}"
        if not isinstance(entry, dict) or "prompt_en" not in entry:
            raise ValueError(f"Invalid {where}: expected an object with 'prompt_en' and 'dimension'.")
        prompt = _check_prompt(entry["prompt_en"], where)
        dimensions = entry.get("dimension", [])
        if not isinstance(dimensions, list) or not all(isinstance(name, str) for name in dimensions):
            raise ValueError(f"Invalid 'dimension' {dimensions!r} at {where}: expected a list of dimension names.")
        auxiliary = entry.get("auxiliary_info", {})
        if not isinstance(auxiliary, dict):
            raise ValueError(f"Invalid 'auxiliary_info' {auxiliary!r} at {where}: expected an object.")

        if prompt not in suite.dimensions:
            suite.prompts.append(prompt)
            suite.dimensions[prompt] = []
            suite.auxiliary_info[prompt] = {}
        suite.dimensions[prompt].extend(name for name in dimensions if name not in suite.dimensions[prompt])
        suite.auxiliary_info[prompt].update(auxiliary)
    return suite


def read_suite(path: str | Path, dimensions: list[str] | None = None, key: str = "evaluate.prompt_suite") -> PromptSuite:
    """Read a prompt suite file; with `dimensions`, keep the prompts tagged with any of them.

    `key` is the params key that named the file, for the error messages.

    Raises FileNotFoundError for a missing file, and ValueError for a malformed or
    empty suite, for `dimensions` with a text suite (it has no tags), or for a
    dimension that no prompt of the suite has.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Prompt suite {path} not found. Set {key} to an existing prompt file, or to null "
            "for the shapes-world prompts."
        )
    suite = _read_json_suite(path) if path.suffix.lower() == ".json" else _read_text_suite(path)
    if not suite.prompts:
        raise ValueError(f"Prompt suite {path} contains no prompts; add one prompt per line.")

    if dimensions is not None:
        if path.suffix.lower() != ".json":
            raise ValueError(
                f"evaluate.suite_dimensions is {dimensions}, but {path} is a plain prompt list without dimension "
                "tags. Use VBench_full_info.json, or set suite_dimensions to null."
            )
        known = sorted({name for names in suite.dimensions.values() for name in names})
        unknown = sorted(set(dimensions) - set(known))
        if unknown:
            raise ValueError(f"Unknown suite dimensions {unknown} for {path}: expected names from {known}.")
        kept = [prompt for prompt in suite.prompts if set(suite.dimensions[prompt]) & set(dimensions)]
        suite = PromptSuite(
            kept,
            {prompt: suite.dimensions[prompt] for prompt in kept},
            {prompt: suite.auxiliary_info[prompt] for prompt in kept},
        )
    logger.info("Read %d unique prompts from %s", len(suite.prompts), path)
    return suite


def load_eval_prompts(prompt_suite: str | None, suite_dimensions: list[str] | None) -> list[str]:
    """Return the eval prompts: the suite file when `prompt_suite` is set, else the prompts stage's eval list."""
    if prompt_suite is None:
        if suite_dimensions is not None:
            raise ValueError(DIMENSIONS_WITHOUT_SUITE)
        return read_prompts(EVAL_PROMPTS)
    return read_suite(prompt_suite, suite_dimensions).prompts


def check_prompt_files(params, root: str | Path = ".") -> None:
    """Read the prompt files that `params` names, and raise ParamsError listing every problem found.

    Checks `prompts.train_file` and `evaluate.prompt_suite` (with `evaluate.suite_dimensions`)
    the way the prompts and evaluate stages read them, with relative paths taken from `root`,
    the project folder. `python -m stages.check` and the Prefect flow call it, so that a bad
    eval suite fails before the stages that come before evaluation run.
    """
    root = Path(root)
    problems = []
    files = [
        ("prompts.train_file", params.prompts.train_file, None),
        ("evaluate.prompt_suite", params.evaluate.prompt_suite, params.evaluate.suite_dimensions),
    ]
    for key, name, dimensions in files:
        if name is None:
            continue
        try:
            read_suite(root / name, dimensions, key=key)
        except (FileNotFoundError, ValueError) as error:
            problems.append(f"{key} = {name!r}: {error}")
    if params.evaluate.prompt_suite is None and params.evaluate.suite_dimensions is not None:
        problems.append(DIMENSIONS_WITHOUT_SUITE)

    if problems:
        raise ParamsError("invalid prompt files in the params:\n  " + "\n  ".join(problems))
