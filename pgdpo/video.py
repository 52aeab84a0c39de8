"""MP4 writing and reading for generated clips.

Clips are uint8 RGB arrays of shape (frames, height, width, 3). They are written as
H.264 (libx264, yuv420p) with PyAV and read back with decord, the decoder that
VBench uses.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

logger = logging.getLogger(__name__)

# x264 options that make the output depend only on the frames and the arguments.
# With one thread and no sliced threads, x264's rate control and lookahead follow
# the same path on every run. "bitexact" keeps the muxer and encoder from writing
# build- or run-dependent strings. x264 still embeds its own version and option
# string in an SEI message, so bytes match only for the same libx264 build.
_X264_PRESET = "medium"
_X264_THREAD_OPTIONS = {"threads": "1", "sliced-threads": "0"}
_READ_CHUNK_BYTES = 1 << 20

# First box types of an ISO base media file (MP4, MOV): files that start with one
# of them get the box-size check in _check_mp4_boxes.
_MP4_FIRST_BOX_TYPES = {b"ftyp", b"free", b"skip", b"wide", b"mdat", b"moov"}


class VideoReadError(ValueError):
    """A video file is missing, empty, truncated or undecodable, or has an unexpected shape."""


def _validate_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray):
        raise ValueError(
            f"Invalid frames of type {type(frames).__name__}: expected a numpy uint8 array "
            "of shape (frames, height, width, 3)."
        )
    if frames.dtype != np.uint8:
        raise ValueError(
            f"Invalid frames dtype {frames.dtype}: expected uint8 RGB. "
            "Convert with np.clip(x, 0, 255).astype(np.uint8) first."
        )
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"Invalid frames shape {frames.shape}: expected (frames, height, width, 3) RGB."
        )
    num_frames, height, width, _ = frames.shape
    if num_frames == 0:
        raise ValueError(f"Invalid frames shape {frames.shape}: a video needs at least 1 frame.")
    if height == 0 or width == 0:
        raise ValueError(f"Invalid frames shape {frames.shape}: height and width must be at least 1.")


def _pad_to_even(frames: np.ndarray, path: Path) -> np.ndarray:
    """Pad the bottom row and right column by edge replication where H or W is odd.

    yuv420p stores chroma at half resolution, so libx264 rejects odd sizes.
    """
    _, height, width, _ = frames.shape
    pad_rows = height % 2
    pad_cols = width % 2
    if not pad_rows and not pad_cols:
        return frames

    logger.warning(
        "Padding %s from %dx%d to %dx%d by edge replication: yuv420p needs an even height and width.",
        path,
        height,
        width,
        height + pad_rows,
        width + pad_cols,
    )
    return np.pad(frames, ((0, 0), (0, pad_rows), (0, pad_cols), (0, 0)), mode="edge")


def _encode(temp_path: Path, frames: np.ndarray, fps: int, crf: int) -> None:
    _, height, width, _ = frames.shape

    with av.open(str(temp_path), mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        stream.codec_context.thread_count = 1
        stream.codec_context.options = {
            "crf": str(crf),
            "preset": _X264_PRESET,
            "flags": "+bitexact",
            **_X264_THREAD_OPTIONS,
        }

        for index, rgb in enumerate(frames):
            # Converted here rather than by the encoder: with the encoder's own conversion, 1 of
            # 300 writes of the same clip under CPU load gave different bytes, and 0 of 1,500
            # with this one (PyAV 18.1, libx264 core 165). The cause inside PyAV was not traced.
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuv420p")
            frame.pts = index
            frame.time_base = stream.time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = 8, crf: int = 12) -> None:
    """Encode uint8 RGB frames (F, H, W, 3) as an H.264 yuv420p MP4 at `path`.

    The file is written to a temporary name in the same folder and renamed into
    place, so readers never see a partial file. The same frames and arguments give
    the same bytes with the same PyAV and libx264 build. Odd heights or widths are
    padded by one replicated row or column, with a warning. Raises ValueError for
    invalid frames, fps or crf.
    """
    path = Path(path)
    _validate_frames(frames)
    if isinstance(fps, bool) or not isinstance(fps, (int, np.integer)) or fps < 1:
        raise ValueError(f"Invalid fps {fps!r}: expected a positive integer.")
    if isinstance(crf, bool) or not isinstance(crf, (int, np.integer)) or not 0 <= crf <= 51:
        raise ValueError(f"Invalid crf {crf!r}: expected an integer from 0 (best quality) to 51.")
    if not path.parent.is_dir():
        raise ValueError(f"Invalid path {path}: folder {path.parent} does not exist. Create it first.")

    frames = _pad_to_even(frames, path)

    # A hidden, unique temporary name in the target folder keeps os.replace atomic
    # (same file system) and lets concurrent writers of one path not collide.
    temp_path = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        _encode(temp_path, frames, int(fps), int(crf))
        with open(temp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise

    logger.debug("Wrote %s: %d frames of %dx%d at %d fps", path, *frames.shape[:3], fps)


def _check_mp4_boxes(path: Path) -> None:
    """Raise VideoReadError if the top-level MP4 boxes do not exactly fill the file.

    decord (through FFmpeg) decodes some truncated files without an error, for
    example when only trailing metadata is cut off, so a cut is detected here from
    the box sizes. Files that do not start with an MP4 box are left to decord.
    """
    file_size = path.stat().st_size
    found_types = []
    with open(path, "rb") as handle:
        offset = 0
        while offset < file_size:
            handle.seek(offset)
            header = handle.read(8)
            if len(header) < 8:
                raise VideoReadError(
                    f"Video file {path} is truncated: {file_size - offset} stray bytes at offset {offset} "
                    "where an MP4 box header was expected. Delete it and regenerate the clip."
                )
            size, box_type_bytes = struct.unpack(">I4s", header)
            if offset == 0 and box_type_bytes not in _MP4_FIRST_BOX_TYPES:
                return
            box_type = box_type_bytes.decode("latin-1")

            header_size = 8
            if size == 1:
                large = handle.read(8)
                if len(large) < 8:
                    raise VideoReadError(
                        f"Video file {path} is truncated inside the header of box {box_type!r} "
                        f"at offset {offset}. Delete it and regenerate the clip."
                    )
                size = struct.unpack(">Q", large)[0]
                header_size = 16
            elif size == 0:
                # A size of 0 means that the box extends to the end of the file.
                size = file_size - offset

            if size < header_size:
                raise VideoReadError(
                    f"Video file {path} is corrupt: box {box_type!r} at offset {offset} declares "
                    f"{size} bytes. Delete it and regenerate the clip."
                )
            if offset + size > file_size:
                raise VideoReadError(
                    f"Video file {path} is truncated: box {box_type!r} at offset {offset} declares "
                    f"{size} bytes but the file ends after {file_size} bytes. "
                    "Delete it and regenerate the clip."
                )
            found_types.append(box_type)
            offset += size

    if "moov" not in found_types:
        raise VideoReadError(
            f"Video file {path} has no 'moov' box, so it is truncated or was never finished. "
            "Delete it and regenerate the clip."
        )


def _warn_if_variable_frame_rate(path: Path, start_times: np.ndarray) -> None:
    """Log a warning when the frame intervals of a video differ by more than 1%.

    Scorers and training treat frames as evenly spaced, so a variable-frame-rate video is
    used frame by frame in decode order and its timestamps are ignored.
    """
    if len(start_times) < 3:
        return
    intervals = np.diff(start_times)
    shortest, longest = float(intervals.min()), float(intervals.max())
    if shortest <= 0 or longest > shortest * 1.01:
        logger.warning(
            "Video %s has a variable frame rate (frame intervals %.4f to %.4f s); its %d frames are "
            "used in order as if evenly spaced. Re-encode it at a constant rate to silence this.",
            path, shortest, longest, len(start_times),
        )


def read_video(
    path: str | os.PathLike, expected_shape: tuple[int, int, int] | None = None
) -> np.ndarray:
    """Decode every frame of a video with decord into uint8 RGB of shape (F, H, W, 3).

    `expected_shape`, if given, is (frames, height, width) and must match exactly.
    Raises VideoReadError, a ValueError, naming the path when the file is missing,
    empty, truncated, has no frames or does not match `expected_shape`.
    """
    # decord is imported here so that writing videos does not load it.
    import decord

    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"Video file not found: {path}. Check the path or regenerate the clip.")
    if path.stat().st_size == 0:
        raise VideoReadError(f"Video file {path} is empty (0 bytes). Delete it and regenerate the clip.")

    _check_mp4_boxes(path)
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        num_frames = len(reader)
        if num_frames == 0:
            raise VideoReadError(f"Video file {path} contains no frames. Delete it and regenerate the clip.")
        frames = reader.get_batch(list(range(num_frames))).asnumpy()
        _warn_if_variable_frame_rate(path, reader.get_frame_timestamp(list(range(num_frames)))[:, 0])
    except (decord.DECORDError, RuntimeError) as error:
        raise VideoReadError(
            f"Failed to decode video {path}: the file is corrupt, not a video or has no video frames. "
            f"Delete it and regenerate the clip. decord: {str(error).strip()[:300]}"
        ) from error

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] != num_frames:
        raise VideoReadError(
            f"Video file {path} decoded to shape {frames.shape}, expected {num_frames} RGB frames. "
            "The file is probably truncated. Delete it and regenerate the clip."
        )

    if expected_shape is not None and tuple(frames.shape[:3]) != tuple(expected_shape):
        raise VideoReadError(
            f"Video file {path} has shape (frames, height, width) {tuple(frames.shape[:3])}, "
            f"expected {tuple(expected_shape)}."
        )
    return frames


def file_sha256(path: str | os.PathLike) -> str:
    """Hash a file's bytes with SHA-256 and return the hex digest."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_READ_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()
