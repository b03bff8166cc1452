"""Tests for mama.data.sampling: frame-index samplers as pure functions."""

from __future__ import annotations

import pytest
import torch

from mama.data.sampling import fps_indices, segment_random_indices, uniform_indices


@pytest.mark.parametrize("num_available", [1, 3, 8, 9, 100, 1001])
@pytest.mark.parametrize("num_frames", [1, 8, 16])
def test_uniform_indices_properties(num_available: int, num_frames: int) -> None:
    indices = uniform_indices(num_available, num_frames)
    assert indices.shape == (num_frames,)
    assert indices.dtype == torch.int64
    assert bool((indices[1:] >= indices[:-1]).all())
    assert int(indices.min()) >= 0 and int(indices.max()) < num_available
    if num_available >= num_frames:
        assert indices.unique().numel() == num_frames  # no repeats unless the video is too short


def test_uniform_indices_values() -> None:
    assert uniform_indices(8, 4).tolist() == [1, 3, 5, 7]  # segment centres
    assert uniform_indices(3, 6).tolist() == [0, 0, 1, 1, 2, 2]  # padded by repeating


@pytest.mark.parametrize("num_available", [2, 8, 37, 500])
def test_segment_random_indices_properties(num_available: int) -> None:
    num_frames, batch = 8, 64
    indices = segment_random_indices(num_available, num_frames, batch, torch.Generator().manual_seed(0))
    assert indices.shape == (batch, num_frames)
    assert bool((indices[:, 1:] >= indices[:, :-1]).all())
    assert int(indices.min()) >= 0 and int(indices.max()) < num_available
    # each pick stays inside (the integer frames touching) its own segment
    bounds = torch.arange(num_frames + 1, dtype=torch.float64) * num_available / num_frames
    assert bool((indices >= bounds[:-1].floor().long()).all())
    assert bool((indices < bounds[1:].ceil().long()).all())


def test_segment_random_indices_deterministic() -> None:
    def draw(seed: int) -> torch.Tensor:
        return segment_random_indices(500, 8, 4, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_fps_indices_constant_rate() -> None:
    times = torch.arange(300, dtype=torch.float64) / 30  # 10 s at 30 fps
    indices = fps_indices(times, target_fps=2)
    assert indices.tolist() == list(range(0, 300, 15))  # every 15th frame: 0, 0.5, ..., 9.5 s
    assert fps_indices(times, target_fps=30).tolist() == list(range(300))
    # upsampling repeats frames but keeps the time span
    up = fps_indices(torch.tensor([0.0, 0.1, 0.2]), target_fps=25)  # grid every 0.04 s
    assert up.tolist() == [0, 0, 1, 1, 2, 2]


def test_fps_indices_variable_rate_picks_nearest_in_time() -> None:
    # 0-1 s at 10 fps, a 2 s freeze, then 4 fps: a frame-rate guess would sample the wrong moments.
    times = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 3.0, 3.25, 3.5, 3.75, 4.0])
    indices = fps_indices(times, target_fps=1)
    assert indices.tolist() == [0, 10, 10, 11, 15]  # 2 s -> 1.0 (tie goes to the earlier frame), 3 s -> 3.0
    picked = times[indices]
    grid = torch.arange(5, dtype=torch.float64)
    assert bool(((picked - grid).abs() <= (times[:, None] - grid).abs().min(dim=0).values + 1e-9).all())


def test_fps_indices_max_frames_and_edge_cases() -> None:
    times = torch.arange(1000, dtype=torch.float64) / 25  # 40 s
    full = fps_indices(times, target_fps=5)
    assert full.numel() == 200
    capped = fps_indices(times, target_fps=5, max_frames=16)
    assert capped.numel() == 16
    assert set(capped.tolist()) <= set(full.tolist())  # a uniform subset of the grid
    assert bool((capped[1:] > capped[:-1]).all())
    assert fps_indices([2.5], target_fps=8).tolist() == [0]  # a single frame is still a clip
    assert fps_indices(times[:2], target_fps=0.01).tolist() == [0]  # grid coarser than the video
    for bad in ([], [0.0, 2.0, 1.0]):
        with pytest.raises(ValueError):
            fps_indices(bad, target_fps=1)
    with pytest.raises(ValueError, match="target_fps"):
        fps_indices(times, target_fps=0)
