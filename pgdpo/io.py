"""Atomic file and folder writes, and the table and prompt-list formats the stages share."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd


def umask_mode(mode: int) -> int:
    """Return `mode` with the process umask applied, as `open` and `mkdir` would create it.

    `tempfile` creates files 0600 and folders 0700 whatever the umask, so outputs built there
    get this mode before they are renamed into place.
    """
    # NOTE: reading the umask means setting it, so another thread creating a file at this
    # instant would get mode 0o666 or 0o777.
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path` in one rename.

    A stage killed inside the block leaves the old `path` (or none) and a `.tmp-*` folder that
    the next run ignores, never a half-written `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    tmp.chmod(umask_mode(0o777))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".old-{path.name}")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        os.fchmod(fd, umask_mode(0o666))
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as sorted, indented JSON, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_table(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a table as CSV, or TSV for a `.tsv` path; fields are quoted where needed, so prompts
    may contain commas, tabs and newlines."""
    sep = "\t" if str(path).endswith(".tsv") else ","
    atomic_write_text(path, table.to_csv(index=False, sep=sep, lineterminator="\n", float_format="%.6g"))


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a CSV table written by `write_table`, keeping prompts as text."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table {path} not found; run the stage that writes it first (dvc repro)")
    sep = "\t" if path.suffix == ".tsv" else ","
    return pd.read_csv(path, sep=sep, keep_default_na=False, na_values=[""], dtype={"prompt": str})


def write_prompts(path: str | os.PathLike, prompts: list[str]) -> None:
    """Write one prompt per line (JSON strings, so prompts with newlines survive)."""
    atomic_write_text(path, "".join(json.dumps(prompt, ensure_ascii=False) + "\n" for prompt in prompts))


def parse_prompt_line(line: str) -> str:
    """Return the prompt of one stripped line: a JSON string as `write_prompts` writes it, else the line itself.

    A plain prompt that merely starts with a quote is kept as written.
    """
    if line.startswith('"') and line.endswith('"') and len(line) > 1:
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            return line
        if isinstance(value, str):
            return value
    return line


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Read a prompt list: JSON-string lines as `write_prompts` writes them, or plain text lines.

    Blank lines are skipped. Raises ValueError for a file with no prompts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found")
    prompts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        prompts.append(parse_prompt_line(line))
    if not prompts:
        raise ValueError(f"prompt file {path} contains no prompts; add one prompt per line")
    return prompts


def canonicalise_safetensors_header(path: str | os.PathLike) -> None:
    """Rewrite a safetensors header with sorted keys, in place and at the same length.

    safetensors writes the `__metadata__` entries in hash-map order, which changes between
    processes, so two saves of the same tensors and metadata can differ in bytes. Tensor
    offsets are explicit in the header, so reordering its keys changes no data.
    """
    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(text) > length:
            raise ValueError(f"canonical header of {path} is longer than the original ({len(text)} > {length} bytes)")
        handle.seek(8)
        # The format allows trailing spaces in the header; safetensors itself pads with them.
        handle.write(text + b" " * (length - len(text)))
