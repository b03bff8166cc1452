"""Tests for mama.data.video: H.264 writing and PyAV decoding."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch

from mama.data.video import VideoDecodeError, count_frames, decode_frames, write_video

T, H, W = 12, 48, 64


def _frames() -> np.ndarray:
    """(T, H, W, 3) uint8: a flat background with a bright bar whose position encodes the frame index."""
    frames = np.full((T, H, W, 3), 40, dtype=np.uint8)
    for t in range(T):
        frames[t, :, 4 * t : 4 * t + 8] = (230, 200, 30)
    return frames


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", _frames(), fps=8)


def test_write_then_decode_full(video: Path) -> None:
    decoded = decode_frames(video)
    assert decoded.dtype == torch.uint8
    assert decoded.shape == (T, H, W, 3)
    # lossy, but flat colours must come back close (crf 18); edges suffer from chroma subsampling
    error = (decoded.float() - torch.from_numpy(_frames()).float()).abs()
    assert error.mean() < 4
    assert count_frames(video) == T
    assert count_frames(video, exact=True) == T


def test_resize(video: Path) -> None:
    decoded = decode_frames(video, size=(24, 40))
    assert decoded.shape == (T, 24, 40, 3)
    assert decode_frames(video, size=(24, 40), indices=[2]).shape == (1, 24, 40, 3)


def test_indices_match_full_decode(video: Path) -> None:
    full = decode_frames(video)
    indices = [5, 0, 3, 3, T - 1]  # any order, repeats allowed
    assert torch.equal(decode_frames(video, indices=indices), full[indices])
    assert torch.equal(decode_frames(video, indices=[1, 2]), full[1:3])  # early stop path
    assert decode_frames(video, indices=[]).shape == (0, H, W, 3)


@pytest.mark.parametrize("indices", [[T], [0, T + 5], [-1]])
def test_bad_indices_raise(video: Path, indices: list[int]) -> None:
    with pytest.raises(VideoDecodeError, match="clip.mp4"):
        decode_frames(video, indices=indices)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.mp4"
    with pytest.raises(VideoDecodeError, match="nope.mp4.*not found"):
        decode_frames(path)
    with pytest.raises(VideoDecodeError, match="nope.mp4"):
        count_frames(path)


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_corrupt_file(tmp_path: Path, video: Path, content: str) -> None:
    path = tmp_path / "corrupt.mp4"
    if content == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    else:
        path.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    with pytest.raises(VideoDecodeError, match="corrupt.mp4"):
        decode_frames(path)
    assert issubclass(VideoDecodeError, ValueError)


def test_file_without_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "audio_only.wav"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with pytest.raises(VideoDecodeError, match="audio_only.wav.*no video stream"):
        decode_frames(path)


def test_write_video_checks_input_and_leaves_no_partial_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 15, 16, 3), np.uint8), fps=8)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "float.mp4", np.zeros((2, 16, 16, 3), np.float32), fps=8)
    with pytest.raises(ValueError, match="shape"):
        write_video(tmp_path / "gray.mp4", np.zeros((2, 16, 16), np.uint8), fps=8)
    # an encoder failure (unknown container) must not leave a temporary file
    with pytest.raises(Exception):
        write_video(tmp_path / "clip.notaformat", np.zeros((2, 16, 16, 3), np.uint8), fps=8)
    assert list(tmp_path.iterdir()) == []


def test_write_video_is_deterministic(tmp_path: Path) -> None:
    a = write_video(tmp_path / "a.mp4", _frames(), fps=8)
    b = write_video(tmp_path / "b.mp4", _frames(), fps=8)
    assert a.read_bytes() == b.read_bytes()
