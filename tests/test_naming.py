"""Tests for pgdpo.naming: VBench names, reversible escaping, truncation and uniqueness."""

from __future__ import annotations

import hashlib
import re

import pytest

from pgdpo.naming import MAX_NAME_BYTES, prompt_from_filename, video_filename

ORDINARY_PROMPTS = [
    "a red circle moving left",
    "A cute happy Corgi playing in park, sunset",
    "The bund Shanghai, vibrant color",
    "a person's hand (close-up) [4k]; 50 off",
    "Iron Man flying in the sky!",
    "route-66 at night & day = great @ 8pm",
]

AWKWARD_PROMPTS = [
    "a cat / a dog",
    "back\\slash",
    "..",
    "../../etc/passwd",
    ".hidden start",
    "100% real",
    "%2F is not a slash",
    'she said "hi"',
    "it's <b>bold</b> | piped: yes? no*",
    "first line\nsecond line",
    "tab\there\rand\x00nul\x7f",
    "a cat 🐱 on a mat 🧶",
    "café naïve",
    "~tilde~",
    " leading and trailing spaces ",
    "ends with dot.",
    "-",
]

WINDOWS_INVALID = set('<>:"/\\|?*')


def assert_portable(name: str) -> None:
    assert name.isascii(), name
    assert len(name.encode("utf-8")) <= MAX_NAME_BYTES, name
    assert not name.startswith("."), name
    assert not WINDOWS_INVALID & set(name), name
    assert all(ord(char) >= 32 and char != "\x7f" for char in name), name
    assert name.endswith(".mp4"), name


@pytest.mark.parametrize("prompt", ORDINARY_PROMPTS)
def test_ordinary_prompt_is_verbatim(prompt):
    assert video_filename(prompt, 3) == f"{prompt}-3.mp4"


@pytest.mark.parametrize("prompt", ORDINARY_PROMPTS + AWKWARD_PROMPTS)
def test_round_trip(prompt):
    for index in (0, 4, 123):
        name = video_filename(prompt, index)

        assert_portable(name)
        assert prompt_from_filename(name) == prompt


def test_awkward_prompt_escapes():
    assert video_filename("a/b", 0) == "a%2Fb-0.mp4"
    assert video_filename("..", 1) == "%2E.-1.mp4"
    assert video_filename("100%", 2) == "100%25-2.mp4"
    assert video_filename("line\nbreak", 0) == "line%0Abreak-0.mp4"
    assert video_filename("cat 🐱", 0) == "cat %F0%9F%90%B1-0.mp4"


def test_long_prompt_truncated_with_hash():
    prompt = "a very long prompt " * 53
    assert len(prompt) > 1000

    name = video_filename(prompt, 2)

    assert_portable(name)
    digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]
    assert name.endswith(f"~{digest}-2.mp4")
    assert name.startswith("a very long prompt a very")
    assert prompt_from_filename(name) is None
    assert video_filename(prompt, 2) == name


def test_long_prompts_with_shared_prefix_differ():
    first = "x" * 1000 + "end one"
    second = "x" * 1000 + "end two"

    assert video_filename(first, 0) != video_filename(second, 0)


def test_truncation_keeps_whole_escapes():
    # 1,000 slashes encode to 3,000 characters of "%2F". Each cut position must
    # leave only complete escapes before the marker.
    for extra in range(3):
        prompt = "a" * extra + "/" * 1000
        name = video_filename(prompt, 0)
        stem = name.split("~")[0]

        assert_portable(name)
        assert re.fullmatch(r"a*(%2F)*", stem), stem


def test_long_emoji_prompt():
    prompt = "🐱" * 1000

    name = video_filename(prompt, 7)

    assert_portable(name)
    assert prompt_from_filename(name) is None


def test_longest_verbatim_name_fits_limit():
    suffix_length = len("-0.mp4")
    fitting = "a" * (MAX_NAME_BYTES - suffix_length)
    too_long = fitting + "a"

    assert video_filename(fitting, 0) == f"{fitting}-0.mp4"
    assert "~" in video_filename(too_long, 0)
    assert len(video_filename(too_long, 0)) <= MAX_NAME_BYTES


def test_duplicates_differ_by_index():
    names = [video_filename("a cat / a dog", index) for index in range(5)]

    assert len(set(names)) == 5
    assert all(prompt_from_filename(name) == "a cat / a dog" for name in names)


def test_names_unique_over_prompt_list():
    prompts = ORDINARY_PROMPTS + AWKWARD_PROMPTS + [
        "a cat",
        "a cat-0",
        "a%20cat",
        "a cat ",
        "a/cat",
        "a%2Fcat",
        "x" * 1000,
        "x" * 1001,
        "y" * 1000 + "/",
    ]
    pairs = [(prompt, index) for prompt in prompts for index in range(5)]

    names = [video_filename(prompt, index) for prompt, index in pairs]

    assert len(set(names)) == len(pairs)


@pytest.mark.parametrize(
    "name",
    [
        "a cat-00.mp4",
        "a cat-01.mp4",
        "a%2fcat-0.mp4",
        "a%41cat-0.mp4",
        "a%2-0.mp4",
        "a cat-0.avi",
        "nodash.mp4",
        "a cat-x.mp4",
        "-0.mp4",
        "a/cat-0.mp4",
        ".hidden-0.mp4",
        "%FF-0.mp4",
        "a cat-٣.mp4",
    ],
)
def test_non_canonical_names_return_none(name):
    assert prompt_from_filename(name) is None


@pytest.mark.parametrize(
    ("prompt", "index", "message"),
    [
        ("", 0, "empty"),
        ("a cat", -1, "index -1"),
        ("a cat", True, "index True"),
        ("a cat", 1.0, "index 1.0"),
        ("bad \ud800 surrogate", 0, "surrogate"),
        (b"bytes", 0, "type bytes"),
    ],
)
def test_invalid_arguments(prompt, index, message):
    with pytest.raises(ValueError, match=message):
        video_filename(prompt, index)
