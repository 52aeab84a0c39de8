"""Video file names in the layout of VBench's standard mode, `{prompt}-{index}.mp4`.

VBench's standard mode finds the clips of a prompt by this exact name, so ordinary
prompts are kept verbatim. Other characters are percent-encoded, and very long
names are truncated with a hash suffix. The manifest stores the exact prompt of
every clip, so truncated names never need to be decoded.
"""

from __future__ import annotations

import hashlib
import re
import string

# Maximum length of a returned name, in bytes. Names are ASCII, so bytes equal characters.
# ext4, APFS and NTFS allow 255 bytes per name, and the margin leaves room for
# the temporary names that pgdpo.video.write_mp4 writes next to the target.
MAX_NAME_BYTES = 200

# Characters kept verbatim: ASCII letters, digits, space and punctuation that is
# valid in file names on Linux, macOS and Windows. Everything else is encoded,
# including "%" (the escape character), "~" (the truncation marker), the path
# separators "/" and "\", the Windows-reserved <>:"|?*, control characters and
# all non-ASCII text. Non-ASCII is encoded because macOS may store names in a
# different Unicode normalization form, which would change the decoded prompt.
SAFE_CHARACTERS = frozenset(string.ascii_letters + string.digits + " !#$&'()+,-.;=@[]^_`{}")

TRUNCATION_MARKER = "~"
HASH_SUFFIX_HEX_DIGITS = 16

_EXTENSION = ".mp4"
_ESCAPE_PATTERN = re.compile(r"%[0-9A-F]{2}")


def _encode_prompt(prompt: str) -> str:
    parts = []
    for position, char in enumerate(prompt):
        # A leading dot would hide the file on Linux and macOS. Dots elsewhere are
        # harmless because the name always ends in "-{index}.mp4", so it can
        # never be "." or "..".
        if char in SAFE_CHARACTERS and not (position == 0 and char == "."):
            parts.append(char)
            continue
        try:
            encoded = char.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"Invalid prompt {prompt!r}: character {position} ({char!r}) is a lone surrogate, "
                "which has no UTF-8 encoding. Fix the prompt text."
            ) from error
        parts.append("".join(f"%{byte:02X}" for byte in encoded))
    return "".join(parts)


def _truncate_encoded(encoded: str, budget: int) -> str:
    """Cut `encoded` to at most `budget` characters without splitting a %XX escape."""
    cut = budget
    if encoded[cut - 1] == "%":
        cut -= 1
    elif cut >= 2 and encoded[cut - 2] == "%":
        cut -= 2
    return encoded[:cut]


def video_filename(prompt: str, index: int) -> str:
    """Build the file name of sample `index` of `prompt`: `{prompt}-{index}.mp4` for ordinary prompts.

    A prompt made only of SAFE_CHARACTERS, not starting with ".", gives exactly
    f"{prompt}-{index}.mp4", the name VBench's standard mode expects. Any other
    character is replaced by the percent-encoding of its UTF-8 bytes, with
    uppercase hex, and "%" itself becomes "%25". prompt_from_filename inverts this.

    If the name would exceed MAX_NAME_BYTES, the encoded prompt is cut and
    "~" plus the first 16 hex digits of the SHA-256 of the UTF-8 prompt are
    appended before "-{index}.mp4". Such a name cannot be decoded, so the exact
    prompt must come from the manifest.

    The result depends only on (prompt, index), and different pairs give different
    names, except truncated names that share a 64-bit hash prefix.
    NOTE: names that differ only in letter case collide on case-insensitive file
    systems (the macOS and Windows defaults). VBench's layout keeps the case, so
    the case is not encoded.

    Raises ValueError for an empty prompt, a prompt with lone surrogates, or an
    index that is not a non-negative int.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"Invalid prompt of type {type(prompt).__name__}: expected str.")
    if not prompt:
        raise ValueError("Invalid prompt '': an empty prompt has no file name. Pass the prompt text.")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"Invalid index {index!r}: expected a non-negative int such as 0 to 4.")

    encoded = _encode_prompt(prompt)
    suffix = f"-{index}{_EXTENSION}"
    if len(encoded) + len(suffix) <= MAX_NAME_BYTES:
        return encoded + suffix

    digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:HASH_SUFFIX_HEX_DIGITS]
    marker = TRUNCATION_MARKER + digest
    budget = MAX_NAME_BYTES - len(suffix) - len(marker)
    if budget < 1:
        raise ValueError(
            f"Invalid index {index}: its {len(str(index))} digits leave no room for the prompt "
            f"in a {MAX_NAME_BYTES}-byte file name."
        )
    return _truncate_encoded(encoded, budget) + marker + suffix


def prompt_from_filename(name: str) -> str | None:
    """Decode the exact prompt from a name made by video_filename.

    Returns None for a truncated name (one containing "~"), and for any name that
    video_filename would not produce, such as a path, another extension, lowercase
    escapes or a malformed index. For truncated names, look the prompt up in the
    manifest.
    """
    if not isinstance(name, str) or not name.endswith(_EXTENSION):
        return None
    stem, separator, index_text = name[: -len(_EXTENSION)].rpartition("-")
    if not separator or not stem or not index_text.isascii() or not index_text.isdigit():
        return None
    if TRUNCATION_MARKER in stem:
        return None

    # Every "%" must start an escape, and the escaped bytes must be valid UTF-8.
    if stem.count("%") != len(_ESCAPE_PATTERN.findall(stem)):
        return None
    raw = bytearray()
    position = 0
    while position < len(stem):
        if stem[position] == "%":
            raw.append(int(stem[position + 1 : position + 3], 16))
            position += 3
        else:
            raw.extend(stem[position].encode("utf-8"))
            position += 1
    try:
        prompt = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None

    # Only the canonical name of a prompt decodes, so each name maps to one prompt.
    try:
        canonical = video_filename(prompt, int(index_text))
    except ValueError:
        return None
    return prompt if canonical == name else None
