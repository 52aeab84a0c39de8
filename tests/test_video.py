"""Tests for pgdpo.video: MP4 round trip, byte determinism, padding and read errors."""

from __future__ import annotations

import hashlib
import logging

import av
import cv2
import numpy as np
import pytest

from pgdpo import video
from pgdpo.video import VideoReadError, file_sha256, read_video, write_mp4


def make_clip(num_frames: int = 16, height: int = 64, width: int = 96, shift: int = 2) -> np.ndarray:
    """Build a blurred-noise texture translating right by `shift` px per frame."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (height, width + shift * num_frames, 3), dtype=np.uint8)
    texture = cv2.GaussianBlur(noise, (0, 0), 2.0)
    offsets = [shift * (num_frames - t) for t in range(num_frames)]
    return np.stack([texture[:, offset : offset + width] for offset in offsets])


def write_zero_frame_mp4(path) -> None:
    """Write a valid MP4 with an H.264 stream that contains no frames."""
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = 32
        stream.height = 32
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
        container.mux(stream.encode(None))


def test_round_trip_matches_input(tmp_path):
    clip = make_clip()
    path = tmp_path / "clip.mp4"

    write_mp4(path, clip)
    decoded = read_video(path)

    assert decoded.shape == clip.shape
    assert decoded.dtype == np.uint8
    error = np.abs(decoded.astype(np.int16) - clip.astype(np.int16))
    # Measured with PyAV 18.1 and decord 0.6.0: mean 2.19, max 14 at crf=12.
    assert error.mean() < 4.0
    assert error.max() < 40


def test_round_trip_single_frame(tmp_path):
    clip = make_clip(num_frames=1)
    path = tmp_path / "one.mp4"

    write_mp4(path, clip)

    assert read_video(path).shape == (1, 64, 96, 3)


def test_write_is_byte_deterministic(tmp_path):
    clip = make_clip()
    first = tmp_path / "first.mp4"
    second = tmp_path / "second name.mp4"

    write_mp4(first, clip)
    write_mp4(second, clip)
    write_mp4(first, clip)

    assert file_sha256(first) == file_sha256(second)


def test_different_frames_give_different_bytes(tmp_path):
    clip = make_clip()
    changed = clip.copy()
    changed[5] = 255 - changed[5]

    write_mp4(tmp_path / "a.mp4", clip)
    write_mp4(tmp_path / "b.mp4", changed)

    assert file_sha256(tmp_path / "a.mp4") != file_sha256(tmp_path / "b.mp4")


def test_odd_size_padded_with_warning(tmp_path, caplog):
    clip = make_clip(num_frames=8, height=63, width=95)
    path = tmp_path / "odd.mp4"

    with caplog.at_level(logging.WARNING, logger="pgdpo.video"):
        write_mp4(path, clip)
    decoded = read_video(path)

    assert "63x95 to 64x96" in caplog.text
    assert decoded.shape == (8, 64, 96, 3)
    inner_error = np.abs(decoded[:, :63, :95].astype(np.int16) - clip.astype(np.int16)).mean()
    assert inner_error < 4.0
    # The padded column repeats the last input column.
    edge_error = np.abs(decoded[:, :63, 95].astype(np.int16) - clip[:, :, 94].astype(np.int16)).mean()
    assert edge_error < 8.0


def test_write_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "clip.mp4"

    write_mp4(path, make_clip(num_frames=4))
    write_mp4(path, make_clip(num_frames=6))

    assert [entry.name for entry in tmp_path.iterdir()] == ["clip.mp4"]
    assert read_video(path).shape[0] == 6


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    write_mp4(path, make_clip(num_frames=4))
    old_hash = file_sha256(path)

    def failing_encode(temp_path, frames, fps, crf):
        temp_path.write_bytes(b"partial")
        raise RuntimeError("simulated encoder failure")

    monkeypatch.setattr(video, "_encode", failing_encode)
    with pytest.raises(RuntimeError, match="simulated"):
        write_mp4(path, make_clip(num_frames=6))

    assert file_sha256(path) == old_hash
    assert [entry.name for entry in tmp_path.iterdir()] == ["clip.mp4"]


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (np.zeros((0, 16, 16, 3), dtype=np.uint8), "at least 1 frame"),
        (np.zeros((2, 16, 16, 3), dtype=np.float32), "dtype float32"),
        (np.zeros((2, 16, 16), dtype=np.uint8), r"shape \(2, 16, 16\)"),
        (np.zeros((2, 16, 16, 4), dtype=np.uint8), r"shape \(2, 16, 16, 4\)"),
        (np.zeros((2, 0, 16, 3), dtype=np.uint8), "height and width"),
        ([[0]], "type list"),
    ],
)
def test_write_rejects_invalid_frames(tmp_path, frames, message):
    with pytest.raises(ValueError, match=message):
        write_mp4(tmp_path / "bad.mp4", frames)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("fps", "crf", "message"), [(0, 12, "fps 0"), (8.5, 12, "fps 8.5"), (8, 52, "crf 52")])
def test_write_rejects_invalid_settings(tmp_path, fps, crf, message):
    with pytest.raises(ValueError, match=message):
        write_mp4(tmp_path / "bad.mp4", make_clip(num_frames=2), fps=fps, crf=crf)


def test_write_rejects_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        write_mp4(tmp_path / "absent" / "clip.mp4", make_clip(num_frames=2))


def test_read_missing_file(tmp_path):
    path = tmp_path / "absent.mp4"

    with pytest.raises(VideoReadError, match="not found") as info:
        read_video(path)

    assert str(path) in str(info.value)


def test_read_zero_byte_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")

    with pytest.raises(VideoReadError, match="empty") as info:
        read_video(path)

    assert str(path) in str(info.value)


@pytest.mark.parametrize("kept_fraction", [0.1, 0.5, 0.9, 0.99])
def test_read_truncated_file(tmp_path, kept_fraction):
    path = tmp_path / "clip.mp4"
    write_mp4(path, make_clip())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * kept_fraction)])

    with pytest.raises(VideoReadError, match="truncated") as info:
        read_video(path)

    assert str(path) in str(info.value)


def test_read_zero_frame_file(tmp_path):
    path = tmp_path / "no_frames.mp4"
    write_zero_frame_mp4(path)
    assert path.stat().st_size > 0

    with pytest.raises(VideoReadError, match="no video frames") as info:
        read_video(path)

    assert str(path) in str(info.value)


def test_read_non_video_file(tmp_path):
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())

    with pytest.raises(VideoReadError, match="Failed to decode"):
        read_video(path)


def test_read_expected_shape(tmp_path):
    path = tmp_path / "clip.mp4"
    write_mp4(path, make_clip(num_frames=8))

    assert read_video(path, expected_shape=(8, 64, 96)).shape == (8, 64, 96, 3)
    with pytest.raises(VideoReadError, match=r"\(8, 64, 96\).*expected \(9, 64, 96\)"):
        read_video(path, expected_shape=(9, 64, 96))


def test_read_error_is_value_error():
    assert issubclass(VideoReadError, ValueError)


def test_file_sha256_matches_hashlib(tmp_path):
    path = tmp_path / "data.bin"
    data = bytes(range(256)) * 5000
    path.write_bytes(data)

    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
