"""Atomic writes and canonical safetensors headers."""

from __future__ import annotations

import json
import os
import stat
import struct

import torch
from safetensors.torch import load_file, save_file

from pgdpo.io import atomic_dir, canonicalise_safetensors_header, read_prompts, write_json, write_prompts


def test_safetensors_header_order_canonical(tmp_path):
    tensors = {"b": torch.arange(4.0), "a": torch.ones(2, 3)}
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    save_file(tensors, str(first), metadata={"format": "pt", "lora_adapter_metadata": "{}"})
    save_file(tensors, str(second), metadata={"lora_adapter_metadata": "{}", "format": "pt"})

    # Swap the metadata keys of the second file by hand, as another process's hash order would.
    raw = bytearray(second.read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
    text = json.dumps(header, separators=(",", ":")).encode()
    raw[8 : 8 + length] = text + b" " * (length - len(text))
    second.write_bytes(bytes(raw))

    canonicalise_safetensors_header(first)
    canonicalise_safetensors_header(second)
    assert first.read_bytes() == second.read_bytes()
    loaded = load_file(str(first))
    assert torch.equal(loaded["a"], tensors["a"])
    assert torch.equal(loaded["b"], tensors["b"])


def test_prompts_round_trip_awkward_text(tmp_path):
    prompts = ["a red circle moving left", 'quote " and\nnewline', "emoji 🎥 / ..", "%20"]
    write_prompts(tmp_path / "prompts.txt", prompts)
    assert read_prompts(tmp_path / "prompts.txt") == prompts


def test_read_prompts_keeps_plain_quoted_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text('"starts with a quote\n"two" words "here"\n"json \\u00e9"\n', encoding="utf-8")

    assert read_prompts(path) == ['"starts with a quote', '"two" words "here"', "json é"]


def test_atomic_outputs_follow_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        write_json(tmp_path / "metrics.json", {"value": 1})
        with atomic_dir(tmp_path / "folder") as folder:
            (folder / "file.txt").write_text("x")
    finally:
        os.umask(previous)

    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755
