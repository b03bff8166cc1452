"""Keyframe extraction and the keyframe grid (mama.augment.keyframes) on generated videos with known cuts."""

from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from mama.augment.keyframes import (
    Keyframes,
    _blur_is_identity,
    _blur_taps,
    _gaussian_blur,
    _local_maxima,
    _separable_blur,
    _to_gray,
    choose_keyframes,
    difference_signal,
    extract_keyframes,
    find_peaks,
    keyframe_grid,
    save_image,
    tile_grid,
)
from mama.data.sampling import uniform_indices
from mama.data.video import VideoDecodeError, decode_frames, write_video

SCENE_LENGTHS = [14, 10, 17, 12, 9, 15]  # 77 frames, cuts at 14, 24, 41, 53, 62


def _scene_frames(
    scene_lengths: list[int], height: int, width: int, seed: int, noise: float = 0.5
) -> tuple[np.ndarray, list[int]]:
    """Frames ``(T, H, W, 3)`` uint8 of scenes with hard cuts between them, and the cut frame indices.

    Each scene is a 16 px block mosaic of random colours with a fixed texture, light per-frame noise (std
    ``noise`` grey levels) and
    a small square drifting 1 px per frame (motion inside the scene). Random colours make about half of
    the pixels brighter at each cut: the authors' difference counts brightened pixels only.
    """
    rng = np.random.default_rng(seed)
    frames: list[np.ndarray] = []
    cuts: list[int] = []
    for scene, length in enumerate(scene_lengths):
        if scene:
            cuts.append(len(frames))
        blocks = rng.integers(30, 226, (height // 16, width // 16, 3))
        base = np.repeat(np.repeat(blocks, 16, axis=0), 16, axis=1).astype(np.float32)  # (H, W, 3)
        base += rng.normal(0.0, 6.0, base.shape)
        for step in range(length):
            frame = base + rng.normal(0.0, noise, base.shape)
            frame[height - 24 : height - 16, 8 + step : 16 + step] = 240.0
            frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return np.stack(frames), cuts


@pytest.fixture(scope="module")
def cut_video(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """A 96x64 H.264 video of 77 frames with cuts at known frames."""
    frames, cuts = _scene_frames(SCENE_LENGTHS, 64, 96, seed=0)
    path = write_video(tmp_path_factory.mktemp("keyframes") / "cuts.mp4", frames, fps=25)
    return path, cuts


def _near(index: int, targets: list[int], tolerance: int = 1) -> bool:
    return any(abs(index - target) <= tolerance for target in targets)


# ----------------------------------------------------------------------------------------- find_peaks


def test_find_peaks_ignores_quadratic_trend_and_finds_spikes() -> None:
    frame = np.arange(300, dtype=np.float64)
    # A concave trend has its own local maximum at frame 150; without baseline removal it would be a peak.
    trend = 2000.0 - 0.08 * (frame - 150.0) ** 2
    wiggle = 5.0 * np.sin(frame * 0.7)
    signal = trend + wiggle
    spikes = [40, 95, 210, 260]
    signal[spikes] += 900.0
    # Neither the top of the trend nor the wiggle's maxima count, only the spikes.
    assert find_peaks(signal, threshold=0.1) == spikes


def test_local_maxima_plateaus_and_edges() -> None:
    values = np.zeros(40)
    values[5] = 100.0  # single-sample spike
    values[12:15] = 80.0  # plateau of 3: its middle
    values[20:22] = 60.0  # plateau of 2: the left one, as peakutils picks
    values[25:28] = [3.0, 3.0, 9.0]  # a step up is not a maximum until it comes down
    values[0] = values[39] = 90.0  # edges are never maxima
    assert _local_maxima(values).tolist() == [5, 13, 20, 27]


def test_find_peaks_threshold_and_flat_tops() -> None:
    signal = np.zeros(40)
    signal[5] = 100.0
    signal[12:15] = 80.0  # a flat top gives one peak on it (the baseline may tilt it a little)
    signal[30] = 5.0  # below 10% of the range
    signal[0] = 90.0  # edges are never peaks
    peaks = find_peaks(signal, threshold=0.1)
    assert len(peaks) == 2 and peaks[0] == 5 and 12 <= peaks[1] <= 14
    assert find_peaks(signal, threshold=0.0)[-1] == 30
    assert find_peaks(signal, threshold=0.9) == [5]


def test_find_peaks_degenerate_inputs_and_bad_threshold() -> None:
    assert find_peaks(np.zeros(50)) == []
    assert find_peaks(np.full(50, 7.0)) == []
    assert find_peaks(np.array([0.0, 5.0])) == []
    for threshold in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="threshold"):
            find_peaks(np.arange(10.0), threshold=threshold)
    with pytest.raises(ValueError, match="1-D"):
        find_peaks(np.zeros((3, 3)))


# ------------------------------------------------------------------------------------- choose_keyframes


def test_choose_keyframes_spreads_evenly_over_many_peaks() -> None:
    peaks = list(range(3, 400, 7))  # 57 peaks
    chosen = choose_keyframes(peaks, num_frames=400, num=12)
    assert chosen == [peaks[i] for i in uniform_indices(len(peaks), 12).tolist()]
    assert chosen == sorted(set(chosen)) and len(chosen) == 12
    positions = [peaks.index(c) for c in chosen]
    gaps = np.diff(positions)
    assert gaps.min() >= 4 and gaps.max() <= 5  # 57 / 12 = 4.75 peaks apart
    # Unsorted input with duplicates gives the same answer.
    assert choose_keyframes(peaks[::-1] + peaks[:5], num_frames=400, num=12) == chosen


def test_choose_keyframes_fills_with_uniform_frames_when_few_peaks() -> None:
    chosen = choose_keyframes([10, 50], num_frames=100, num=12)
    assert len(chosen) == 12 and chosen == sorted(set(chosen))
    assert {10, 50} <= set(chosen)
    assert max(np.diff([0, *chosen, 99])) <= 2 * 100 / 12
    # No peaks at all: plain uniform sampling.
    assert choose_keyframes([], num_frames=100, num=12) == uniform_indices(100, 12).tolist()
    # Exactly as many frames as keyframes: every frame once.
    assert choose_keyframes([3], num_frames=12, num=12) == list(range(12))


def test_choose_keyframes_repeats_frames_of_a_short_video() -> None:
    chosen = choose_keyframes([2], num_frames=5, num=12)
    assert len(chosen) == 12 and chosen == sorted(chosen)
    assert set(chosen) == set(range(5))


def test_choose_keyframes_errors() -> None:
    with pytest.raises(ValueError, match="num"):
        choose_keyframes([1], num_frames=10, num=0)
    with pytest.raises(ValueError, match="num_frames"):
        choose_keyframes([], num_frames=0, num=3)
    with pytest.raises(ValueError, match="peaks"):
        choose_keyframes([10], num_frames=10, num=3)


# ------------------------------------------------------------------------------------ on real videos


def test_peaks_match_scene_cuts(cut_video: tuple[Path, list[int]]) -> None:
    path, cuts = cut_video
    signal, fps = difference_signal(path)
    assert signal.shape == (sum(SCENE_LENGTHS),) and signal.dtype == np.float64
    assert signal[0] == 0.0 and fps == pytest.approx(25.0)
    peaks = find_peaks(signal, threshold=0.1)
    assert all(_near(cut, peaks) for cut in cuts), (cuts, peaks)
    assert all(_near(peak, cuts) for peak in peaks), (cuts, peaks)


def test_streaming_signal_equals_signal_of_all_frames(cut_video: tuple[Path, list[int]]) -> None:
    path, _ = cut_video
    blurred = [_gaussian_blur(_to_gray(frame)) for frame in decode_frames(path).numpy()]
    expected = [0] + [int(np.count_nonzero(cur > prev)) for prev, cur in itertools.pairwise(blurred)]
    assert difference_signal(path, analysis_size=None)[0].tolist() == expected


def test_gray_and_blur_follow_opencv() -> None:
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], dtype=np.uint8)
    assert _to_gray(rgb).tolist() == [[76, 150, 29, 255]]  # cv2.cvtColor(..., RGB2GRAY)
    assert np.array_equal(_gaussian_blur(np.full((20, 30), 77, np.uint8)), np.full((20, 30), 77))
    impulse = np.zeros((21, 21), np.uint8)
    impulse[10, 10] = 255
    sigma = 0.3 * ((9 - 1) * 0.5 - 1) + 0.8  # OpenCV's sigma for ksize 9 and sigma 0
    taps = np.exp(-((np.arange(9) - 4) ** 2) / (2 * sigma**2))
    taps /= taps.sum()
    expected = np.zeros((21, 21))
    expected[6:15, 6:15] = 255 * np.outer(taps, taps)
    assert np.abs(_gaussian_blur(impulse).astype(float) - expected).max() <= 0.5 + 1e-4


def test_downscaled_analysis_still_finds_cuts(tmp_path: Path) -> None:
    frames, cuts = _scene_frames(SCENE_LENGTHS, 128, 192, seed=1)
    path = write_video(tmp_path / "big.mp4", frames, fps=25)
    for analysis_size in (64, 32, None):
        signal, _ = difference_signal(path, analysis_size=analysis_size)
        peaks = find_peaks(signal)
        assert all(_near(cut, peaks) for cut in cuts), (analysis_size, cuts, peaks)
        assert all(_near(peak, cuts) for peak in peaks), (analysis_size, cuts, peaks)
    # The analysis resolution sets how many pixels can change: 64 px short side is 1/4 of the area.
    assert difference_signal(path, analysis_size=64)[0].max() < difference_signal(path, analysis_size=None)[0].max()


def test_extract_keyframes_spreads_over_peaks_and_fills(cut_video: tuple[Path, list[int]]) -> None:
    path, _ = cut_video
    few = extract_keyframes(path, num=3)
    assert isinstance(few, Keyframes) and few.num_frames == sum(SCENE_LENGTHS)
    assert few.keyframes == [few.peaks[i] for i in uniform_indices(len(few.peaks), 3).tolist()]

    full = extract_keyframes(path, num=12)  # 5 cuts < 12: all peaks plus uniform fill
    assert len(full.keyframes) == 12 and full.keyframes == sorted(set(full.keyframes))
    assert set(full.peaks) <= set(full.keyframes)
    assert all(0 <= k < full.num_frames for k in full.keyframes)


def test_video_shorter_than_num_keyframes(tmp_path: Path) -> None:
    frames, _ = _scene_frames([3, 2], 64, 96, seed=2)
    path = write_video(tmp_path / "short.mp4", frames, fps=10)
    keyframes, grid = keyframe_grid(path, num=12, tile_short_side=32)
    assert keyframes.num_frames == 5
    assert len(keyframes.keyframes) == 12 and set(keyframes.keyframes) == set(range(5))
    assert grid.shape == (3 * 32, 4 * 48, 3)


def test_to_json(cut_video: tuple[Path, list[int]]) -> None:
    path, _ = cut_video
    keyframes = extract_keyframes(path, num=4)
    record = keyframes.to_json()
    assert set(record) == {"video", "num_frames", "fps", "peaks", "keyframes"}
    assert record["video"] == str(path) and record["num_frames"] == 77 and record["fps"] == pytest.approx(25.0)
    assert json.loads(json.dumps(record)) == record
    assert all(isinstance(i, int) for i in record["peaks"] + record["keyframes"])


def test_frame_folder_matches_cuts_exactly(tmp_path: Path) -> None:
    # No per-frame noise: a lossless folder keeps all of it, the authors' count of brightened pixels is then
    # a sizeable fraction of a cut's, and frame 1 (after frame 0's placeholder 0) passes the threshold.
    frames, cuts = _scene_frames([6, 5, 7], 64, 96, seed=3, noise=0.0)
    folder = tmp_path / "frames"
    folder.mkdir()
    for index, frame in enumerate(frames):
        save_image(folder / f"{index:04d}.png", frame)
    keyframes = extract_keyframes(folder, num=4)
    # Lossless frames: no codec flicker, so the peaks are exactly the cuts.
    assert keyframes.peaks == cuts and keyframes.fps is None and keyframes.num_frames == 18
    assert set(cuts) <= set(keyframes.keyframes)


# ---------------------------------------------------------------------------------------------- grid


def test_tile_grid_layout_row_major() -> None:
    colours = torch.arange(1, 8, dtype=torch.uint8) * 30  # 7 frames, one grey level each
    frames = colours.view(7, 1, 1, 1).expand(7, 5, 6, 3).contiguous()  # (7, 5, 6, 3)
    grid = tile_grid(frames, rows=2, cols=4)
    assert grid.shape == (10, 24, 3) and grid.dtype == torch.uint8
    for index in range(8):
        row, col = divmod(index, 4)
        cell = grid[row * 5 : (row + 1) * 5, col * 6 : (col + 1) * 6]
        expected = int(colours[index]) if index < 7 else 0  # the 8th cell is empty: black
        assert bool((cell == expected).all()), index
    with pytest.raises(ValueError, match="grid"):
        tile_grid(frames, rows=2, cols=3)
    with pytest.raises(ValueError, match="uint8"):
        tile_grid(frames.float(), rows=2, cols=4)


def test_keyframe_grid_tiles_keyframes_in_temporal_order(cut_video: tuple[Path, list[int]]) -> None:
    path, _ = cut_video
    keyframes, grid = keyframe_grid(path, num=6, rows=2, cols=3, tile_short_side=32)
    assert keyframes.keyframes == sorted(keyframes.keyframes)
    tiles = decode_frames(path, indices=keyframes.keyframes, short_side=32)  # (6, 32, 48, 3)
    assert grid.shape == (64, 144, 3)
    assert torch.equal(grid, tile_grid(tiles, rows=2, cols=3))
    # Cell (1, 0) holds the 4th keyframe.
    assert torch.equal(grid[32:64, 0:48], tiles[3])


# ------------------------------------------------------------------------------------------ save_image


def _read_image(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24")


def test_save_image_png_round_trip_odd_size(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 256, (33, 47, 3), dtype=np.uint8)
    path = save_image(tmp_path / "grid.png", torch.from_numpy(image))
    assert path == tmp_path / "grid.png"
    assert np.array_equal(_read_image(path), image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]  # no temporary file left


def test_save_image_jpeg_is_close(tmp_path: Path) -> None:
    rows, cols = np.mgrid[0:101, 0:151]
    image = np.stack([rows * 2, cols, (rows + cols) // 2], axis=-1).astype(np.uint8)  # smooth, odd size
    image[20:50, 30:80] = (200, 30, 40)
    for name in ("grid.jpg", "grid.JPEG"):
        decoded = _read_image(save_image(tmp_path / name, image))
        assert decoded.shape == image.shape
        assert np.abs(decoded.astype(int) - image).mean() < 3.0
    # Overwrites in place.
    save_image(tmp_path / "grid.jpg", np.zeros_like(image))
    assert _read_image(tmp_path / "grid.jpg").max() <= 2


def test_save_image_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="suffix"):
        save_image(tmp_path / "grid.bmp", np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        save_image(tmp_path / "grid.png", np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        save_image(tmp_path / "grid.png", np.zeros((4, 4), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------- errors


def test_unreadable_videos_raise_video_decode_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.mp4"
    with pytest.raises(VideoDecodeError, match="missing.mp4"):
        extract_keyframes(missing)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"not a video at all" * 100)
    with pytest.raises(VideoDecodeError, match="corrupt.mp4"):
        keyframe_grid(corrupt)
    audio_only = tmp_path / "audio.wav"
    with av.open(str(audio_only), mode="w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    with pytest.raises(VideoDecodeError, match="audio.wav"):
        difference_signal(audio_only)


def test_bad_arguments_raise_value_error_before_decoding(tmp_path: Path) -> None:
    missing = tmp_path / "missing.mp4"  # a plain ValueError, not VideoDecodeError: checked before opening
    calls = [
        (lambda: extract_keyframes(missing, num=0), "num"),
        (lambda: extract_keyframes(missing, threshold=1.5), "threshold"),
        (lambda: keyframe_grid(missing, num=12, rows=2, cols=4), "grid"),
        (lambda: keyframe_grid(missing, threshold=-0.2), "threshold"),
    ]
    for call, message in calls:
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert not isinstance(info.value, VideoDecodeError)


def test_blur_shrinks_with_the_analysis_scale() -> None:
    assert np.array_equal(_blur_taps(1.0), _blur_taps(2.0)) and _blur_taps(1.0).size == 9
    half_scale = _blur_taps(0.5)  # 5 taps of sigma 0.85
    assert half_scale.size == 5 and half_scale.sum() == pytest.approx(1.0)
    assert half_scale[1] / half_scale[2] == pytest.approx(np.exp(-1 / (2 * 0.85**2)), rel=1e-5)
    assert _blur_taps(64 / 1080).size == 3  # never below 3 taps


def test_gray_is_exact_fixed_point() -> None:
    # _to_gray multiplies in float32; the integers stay below 2**24, so it must equal OpenCV's integer formula.
    rng = np.random.default_rng(0)
    levels = np.array([0, 1, 2, 127, 128, 254, 255])
    corners = np.array(list(itertools.product(levels, repeat=3)), dtype=np.uint8)  # (343, 3)
    rgb = np.concatenate([corners, rng.integers(0, 256, (200_000, 3), dtype=np.uint8)]).reshape(-1, 1, 3)
    weights = np.array([4899, 9617, 1868], dtype=np.int64)
    expected = (rgb.astype(np.int64) @ weights + (1 << 13)) >> 14
    assert np.array_equal(_to_gray(rgb), expected.astype(np.uint8))


def test_blur_too_narrow_to_change_a_pixel_is_skipped_exactly() -> None:
    rng = np.random.default_rng(1)
    images = [
        rng.integers(0, 256, (64, 114), dtype=np.uint8),
        (np.indices((40, 60)).sum(axis=0) % 2 * 255).astype(np.uint8),  # checkerboard: the largest neighbour jumps
    ]
    # 64 px analysis of 480p, 720p, 1080p and 4K sources: the scaled blur cannot move a value by 0.5.
    for scale in (64 / 480, 64 / 720, 64 / 1080, 64 / 2160):
        taps = _blur_taps(scale)
        assert _blur_is_identity(taps), scale
        for image in images:
            assert np.array_equal(_separable_blur(image, taps), image), scale
            assert _gaussian_blur(image, taps) is image
    for scale in (1.0, 0.5, 64 / 360):  # wide enough to matter: computed
        assert not _blur_is_identity(_blur_taps(scale))
        assert not np.array_equal(_gaussian_blur(images[1], _blur_taps(scale)), images[1])


def test_downscaled_signal_equals_signal_of_decoded_small_frames(tmp_path: Path) -> None:
    # The analysis thread must see every frame once, in order, and batches must join up: same counts as
    # gray + blur of each frame alone as decode_frames gives it at the same short side (the same resize).
    frames, _ = _scene_frames(SCENE_LENGTHS[:3], 128, 192, seed=4)  # 41 frames: more than one batch
    path = write_video(tmp_path / "small.mp4", frames, fps=25)
    for analysis_size in (64, 32):
        taps = _blur_taps(analysis_size / 128)
        blurred = [_gaussian_blur(_to_gray(f), taps) for f in decode_frames(path, short_side=analysis_size).numpy()]
        expected = [0] + [int(np.count_nonzero(cur > prev)) for prev, cur in itertools.pairwise(blurred)]
        assert difference_signal(path, analysis_size=analysis_size)[0].tolist() == expected


def test_analysis_thread_error_is_raised_and_thread_ends(
    cut_video: tuple[Path, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import mama.augment.keyframes as keyframes_module

    calls = 0
    brightened_pixels = keyframes_module._brightened_pixels

    def failing(blurred: np.ndarray, previous: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 3:  # in the second batch of frames: the decoder is still putting frames on the queue
            raise RuntimeError("analysis failed on purpose")
        return brightened_pixels(blurred, previous)

    monkeypatch.setattr(keyframes_module, "_brightened_pixels", failing)
    threads_before = threading.active_count()
    with pytest.raises(RuntimeError, match="on purpose"):
        difference_signal(cut_video[0])
    assert threading.active_count() == threads_before  # joined, not left blocked on the queue
