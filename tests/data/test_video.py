"""Tests for mama.data.video: H.264 writing and PyAV decoding of real-world inputs.

Private helpers (``_decode_video``, ``_plan_runs``) are used to check that seeking really skips work,
which the public API cannot show.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from mama.data.sampling import fps_indices, uniform_indices
from mama.data.video import (
    VideoDecodeError,
    VideoInfo,
    _decode_sequential,
    _decode_video,
    _plan_runs,
    count_frames,
    decode_frames,
    frame_timestamps,
    probe_video,
    write_video,
)

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
    with pytest.raises(ValueError):
        write_video(tmp_path / "clip.notaformat", np.zeros((2, 16, 16, 3), np.uint8), fps=8)
    assert list(tmp_path.iterdir()) == []


def test_write_video_is_deterministic(tmp_path: Path) -> None:
    a = write_video(tmp_path / "a.mp4", _frames(), fps=8)
    b = write_video(tmp_path / "b.mp4", _frames(), fps=8)
    assert a.read_bytes() == b.read_bytes()


# --- real-world inputs: probing, seeking, VFR, rotation, odd sizes, frame folders ---------------------


def _level_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """(T, H, W, 3) uint8 flat frames whose grey level encodes the frame index (step 8, wraps at 32)."""
    levels = (np.arange(num_frames) % 32) * 8 + 4
    return np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3)).astype(np.uint8)


def _encode(
    path: Path,
    frames: np.ndarray,
    pts: list[int] | None = None,
    time_base: Fraction = Fraction(1, 8),
    gop: int | None = None,
    rotation_ccw: int | None = None,
    pix_fmt: str = "yuv420p",
) -> Path:
    """Encode RGB frames as H.264 with explicit timestamps, GOP length, display rotation or pixel format."""
    pts = list(range(len(frames))) if pts is None else pts
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(1) / time_base)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.time_base = time_base
        stream.codec_context.time_base = time_base
        stream.codec_context.thread_count = 1
        options = {"crf": "18", "preset": "veryfast"}
        if gop is not None:
            # Fixed GOPs (no scene-cut keyframes), so the test knows where seeks can land.
            options["x264-params"] = f"keyint={gop}:min-keyint={gop}:scenecut=0"
        stream.options = options
        if rotation_ccw is not None:
            stream.set_display_rotation(rotation_ccw)
        for rgb, frame_pts in zip(frames, pts, strict=True):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = frame_pts
            frame.time_base = time_base
            for packet in stream.encode(frame.reformat(format=pix_fmt)):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def _level_of(frames: torch.Tensor) -> torch.Tensor:
    """Frame index mod 32 recovered from the grey level of each frame of (T, H, W, 3)."""
    return ((frames.float().mean(dim=(1, 2, 3)) - 4) / 8).round().long() % 32


def test_probe_video(video: Path) -> None:
    info = probe_video(video)
    assert info == VideoInfo(path=video, num_frames=T, fps=8.0, duration_s=T / 8, height=H, width=W, rotation=0)
    assert probe_video(video, exact=True).num_frames == T


def test_short_side_resize_keeps_aspect(video: Path) -> None:
    assert decode_frames(video, short_side=24).shape == (T, 24, 32, 3)  # 48x64 -> 24x32
    assert decode_frames(video, short_side=96, indices=[0, 0]).shape == (2, 96, 128, 3)  # upscaling too
    assert decode_frames(video, short_side=24, indices=[]).shape == (0, 24, 32, 3)
    with pytest.raises(ValueError, match="size or short_side"):
        decode_frames(video, size=(24, 32), short_side=24)


def test_short_video_padded_by_uniform_indices(video: Path) -> None:
    indices = uniform_indices(count_frames(video), 32)  # more frames requested than the video has
    frames = decode_frames(video, indices=indices)
    assert frames.shape == (32, H, W, 3)
    assert torch.equal(frames, decode_frames(video)[indices])


def test_plan_runs_seeks_only_past_keyframes() -> None:
    keyframes = [0, 30, 60, 90]
    # 5 and 20 share the first GOP; 70 is behind keyframe 60; 72 follows on; 95 is behind keyframe 90.
    assert _plan_runs([5, 20, 70, 72, 95], keyframes, min_skip=16) == [(None, [5, 20]), (60, [70, 72]), (90, [95])]
    # a keyframe only a few frames ahead is not worth a seek
    assert _plan_runs([25, 33], keyframes, min_skip=16) == [(None, [25, 33])]
    assert _plan_runs([65], keyframes, min_skip=16) == [(60, [65])]


@pytest.fixture(scope="module")
def long_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frames = _level_frames(2000, 32, 32).copy()
    # A second code (index // 32) in the top rows makes every frame unique, not just unique mod 32.
    frames[:, :8] = ((np.arange(2000) // 32) * 3)[:, None, None, None].astype(np.uint8)
    return _encode(tmp_path_factory.mktemp("long") / "long.mp4", frames, time_base=Fraction(1, 30), gop=30)


def test_sparse_indices_seek_and_match_sequential_decode(long_video: Path) -> None:
    full = decode_frames(long_video)
    assert full.shape == (2000, 32, 32, 3)
    indices = [1999, 5, 1000, 1500, 1501, 77, 1800, 31, 1000, 1029, 1030]
    sparse, num_decoded = _decode_video(long_video, indices, None, None)
    assert torch.equal(sparse, full[indices])
    # Every seek lands exactly on the keyframe before its target (GOPs of 30): the decoder outputs only
    # the frames from there to the run's last target, far fewer than the 2000 up to frame 1999.
    runs = _plan_runs(sorted(set(indices)), list(range(0, 2000, 30)), min_skip=16)
    assert len(runs) > 5
    # (Fewer than that when unwanted non-reference B-frames are dropped without decoding.)
    assert len(set(indices)) <= num_decoded <= sum(targets[-1] - (seek_to or 0) + 1 for seek_to, targets in runs)
    resized, _ = _decode_video(long_video, indices, (16, 24), None)
    sequential, _ = _decode_sequential(long_video, set(indices), (16, 24), None)
    assert torch.equal(resized, torch.from_numpy(np.stack([sequential[i] for i in indices])))
    with pytest.raises(VideoDecodeError, match=r"long.mp4.*\[2000\] out of range"):
        decode_frames(long_video, indices=[10, 2000])


def test_vfr_video_sampled_by_time(tmp_path: Path) -> None:
    # Bursts and gaps: 30 fps, then a 0.5 s freeze, then 10 fps, then 60 fps (times in ms).
    pts_ms = [0, 33, 67, 100, 133, 633, 733, 833, 933, 950, 967, 983, 1000, 1017]
    path = _encode(tmp_path / "vfr.mp4", _level_frames(len(pts_ms), 32, 48), pts=pts_ms, time_base=Fraction(1, 1000))
    times = frame_timestamps(path)
    assert times.dtype == torch.float64
    torch.testing.assert_close(times, torch.tensor(pts_ms, dtype=torch.float64) / 1000, atol=1e-3, rtol=0)
    indices = fps_indices(times, target_fps=5)  # grid 0, 0.2, ..., 1.0 s
    # nearest frames: 0->0 ms, 200->133 (vs 633), 400->633 (vs 133), 600->633, 800->833, 1000->1000
    assert indices.tolist() == [0, 4, 5, 5, 7, 12]
    decoded = decode_frames(path, indices=indices)
    assert _level_of(decoded).tolist() == indices.tolist()


@pytest.mark.parametrize("rotation_ccw", [90, -90, 180])
def test_rotated_video_is_display_oriented(tmp_path: Path, rotation_ccw: int) -> None:
    frames = np.full((3, 48, 64, 3), 30, dtype=np.uint8)
    frames[:, :8, :8] = 220  # marker in the stored frame's top-left corner
    plain = decode_frames(_encode(tmp_path / "plain.mp4", frames))
    path = _encode(tmp_path / "rotated.mp4", frames, rotation_ccw=rotation_ccw)
    rotation_cw = -rotation_ccw % 360

    info = probe_video(path)
    assert info.rotation == rotation_cw
    expected_hw = (64, 48) if rotation_cw in (90, 270) else (48, 64)
    assert (info.height, info.width) == expected_hw
    rotated = decode_frames(path)
    assert rotated.shape == (3, *expected_hw, 3)
    assert torch.equal(rotated, torch.rot90(plain, k=rotation_ccw // 90, dims=(1, 2)))
    # Independently of rot90 conventions: where does the top-left marker end up on screen?
    corner = {90: (0, -1), 180: (-1, -1), 270: (-1, 0)}[rotation_cw]  # (row, col), clockwise turns
    assert rotated[0, corner[0], corner[1]].float().mean() > 150
    assert rotated[0, 0, 0].float().mean() < 80
    # size is in display orientation
    assert decode_frames(path, size=(40, 20), indices=[1]).shape == (1, 40, 20, 3)
    assert decode_frames(path, short_side=24, indices=[1]).shape == (1, *(s // 2 for s in expected_hw), 3)


def test_odd_resolution(tmp_path: Path) -> None:
    frames = _level_frames(5, 47, 63)
    path = _encode(tmp_path / "odd.mp4", frames, pix_fmt="yuv444p")  # 4:4:4 allows odd sizes in H.264
    decoded = decode_frames(path, indices=uniform_indices(5, 8))
    assert decoded.shape == (8, 47, 63, 3)
    assert _level_of(decoded).tolist() == uniform_indices(5, 8).tolist()
    assert decode_frames(path, short_side=20).shape == (5, 20, 27, 3)  # 63 * 20 / 47 = 26.8
    info = probe_video(path)
    assert (info.num_frames, info.height, info.width) == (5, 47, 63)


def _write_image(path: Path, rgb: np.ndarray) -> None:
    """Encode one RGB image as PNG (lossless) or JPEG, by suffix, with PyAV."""
    codec, pix_fmt = ("png", "rgb24") if path.suffix == ".png" else ("mjpeg", "yuvj444p")
    context = av.CodecContext.create(codec, "w")
    context.width, context.height, context.pix_fmt = rgb.shape[1], rgb.shape[0], pix_fmt
    context.time_base = Fraction(1, 1)
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format=pix_fmt)
    packets = context.encode(frame) + context.encode(None)
    path.write_bytes(b"".join(bytes(packet) for packet in packets))


def test_frame_folder(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    frames = np.random.default_rng(0).integers(0, 256, (11, 30, 40, 3), dtype=np.uint8)
    # Unpadded numbers: frame_2 must come before frame_10.
    for t, rgb in enumerate(frames):
        _write_image(folder / f"frame_{t}.png", rgb)
    (folder / "notes.txt").write_text("not a frame")

    assert torch.equal(decode_frames(folder), torch.from_numpy(frames))
    assert torch.equal(decode_frames(folder, indices=[10, 2, 2]), torch.from_numpy(frames[[10, 2, 2]]))
    assert decode_frames(folder, short_side=15, indices=[0]).shape == (1, 15, 20, 3)
    assert decode_frames(folder, size=(8, 8)).shape == (11, 8, 8, 3)
    assert decode_frames(folder, indices=[]).shape == (0, 30, 40, 3)
    assert probe_video(folder) == VideoInfo(folder, 11, None, None, 30, 40, 0)
    assert count_frames(folder) == 11
    with pytest.raises(VideoDecodeError, match=r"frames.*\[11\] out of range"):
        decode_frames(folder, indices=[11])
    with pytest.raises(VideoDecodeError, match="frame folder has no timestamps"):
        frame_timestamps(folder)


def test_frame_folder_jpeg_and_errors(tmp_path: Path) -> None:
    folder = tmp_path / "jpegs"
    folder.mkdir()
    frames = _level_frames(3, 24, 32)
    for t, rgb in enumerate(frames):
        _write_image(folder / f"{t:05d}.JPG", rgb)
    decoded = decode_frames(folder)
    assert (decoded.float() - torch.from_numpy(frames).float()).abs().max() <= 3  # lossy but flat

    (folder / "00003.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(VideoDecodeError, match="00003.jpg"):
        decode_frames(folder, indices=[3])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VideoDecodeError, match="empty.*no JPEG/PNG"):
        probe_video(empty)


def _audio_only(path: Path) -> Path:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def test_probe_and_timestamps_name_bad_files(tmp_path: Path, video: Path) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    audio = _audio_only(tmp_path / "sound.wav")
    cases = [(tmp_path / "missing.mp4", "missing.mp4.*not found"), (garbage, "garbage.mp4"),
             (truncated, "truncated.mp4"), (audio, "sound.wav.*no video stream")]  # fmt: skip
    for path, message in cases:
        for fn in (probe_video, frame_timestamps):
            with pytest.raises(VideoDecodeError, match=message):
                fn(path)
        with pytest.raises(VideoDecodeError, match=message):
            decode_frames(path, indices=[0, 40])  # the scan-then-seek path reports the file too


@pytest.mark.parametrize(
    ("encoder", "options"),
    [
        ("libx264", {"x264-params": "bframes=3:b-adapt=0:b-pyramid=none:keyint=250:scenecut=0"}),
        ("libx265", {"x265-params": "bframes=3:b-adapt=0:b-pyramid=0:keyint=250:scenecut=0:log-level=error"}),
    ],
)
def test_unwanted_non_reference_frames_are_dropped_and_frames_stay_identical(
    tmp_path: Path, encoder: str, options: dict[str, str]
) -> None:
    # One GOP of P B B B groups whose B-frames nobody references: a sparse decode can drop the unwanted ones.
    num_frames = 80
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (64, 96 + num_frames, 3), dtype=np.uint8)
    frames = np.stack([texture[:, t : t + 96] for t in range(num_frames)])  # (T, 64, 96, 3), panning
    frames[:, :8] = ((np.arange(num_frames) * 3) % 256)[:, None, None, None]  # every frame distinct
    path = tmp_path / f"bframes_{encoder}.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(encoder, rate=25)
        assert isinstance(stream, av.video.stream.VideoStream)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.options = options
        for t, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = t
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    full = decode_frames(path)
    assert full.shape[0] == num_frames
    # Every residue mod 4 (P and B positions alike), past the index from which the packet index is used.
    indices = [40, 45, 50, 55, 61, 66, 71, 79]
    sparse, num_decoded = _decode_video(path, indices, None, None)
    assert torch.equal(sparse, full[indices])
    assert num_decoded < num_frames - 10  # about 3 in 4 of the unwanted frames were never decoded
    resized, _ = _decode_video(path, indices, None, 32)
    assert torch.equal(resized, decode_frames(path, short_side=32)[indices])


def _hvcc(num_temporal_layers: int) -> bytes:
    """The first 23 bytes of an hvcC record (version 1) declaring ``num_temporal_layers``."""
    record = bytearray(23)
    record[0] = 1
    record[21] = (num_temporal_layers & 0b111) << 3 | 0b11  # constantFrameRate 0, lengthSizeMinusOne 3
    return bytes(record)


@pytest.mark.parametrize(
    ("codec", "extradata", "safe"),
    [
        ("h264", None, True),
        ("mpeg4", b"", True),
        ("hevc", _hvcc(1), True),
        ("hevc", _hvcc(2), False),  # temporal sub-layers: a TRAIL_N may be referenced by a higher layer
        ("hevc", _hvcc(0), False),  # unknown
        ("hevc", b"\x00\x00\x00\x01" + bytes(30), False),  # Annex B parameter sets, not hvcC
        ("hevc", None, False),
        ("vp9", None, False),
        ("av1", None, False),
    ],
)
def test_frames_are_skipped_only_where_no_other_frame_can_need_them(
    codec: str, extradata: bytes | None, safe: bool
) -> None:
    from mama.data.video import nonref_skip_is_safe

    assert nonref_skip_is_safe(codec, extradata) is safe
