"""Frame-index sampling: which frames of a video to decode, as pure functions of its length or timestamps.

Samplers return 0-based frame indices in presentation order (the order :func:`mama.data.video.decode_frames`
uses). Videos shorter than the requested clip are padded by repeating indices, never by failing, so
every clip of a batch has the same length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where tensors are built: keyframe extraction runs without torch
    import torch
    from torch import Tensor

__all__ = ["fps_indices", "segment_random_indices", "uniform_indices", "uniform_indices_array"]


def uniform_indices_array(num_available: int, num_frames: int) -> np.ndarray:
    """:func:`uniform_indices` as an int64 numpy array (same float64 arithmetic, same values)."""
    positions = (np.arange(num_frames, dtype=np.float64) + 0.5) * num_available / num_frames
    return np.clip(positions.astype(np.int64), 0, num_available - 1)


def uniform_indices(num_available: int, num_frames: int) -> Tensor:
    """Centres of ``num_frames`` equal segments of ``range(num_available)`` (repeats when too short)."""
    import torch

    return torch.from_numpy(uniform_indices_array(num_available, num_frames))


def segment_random_indices(num_available: int, num_frames: int, batch: int, generator: torch.Generator) -> Tensor:
    """(batch, num_frames) indices: one random frame inside each of ``num_frames`` equal segments."""
    import torch

    starts = torch.arange(num_frames, dtype=torch.float64) * num_available / num_frames
    width = num_available / num_frames
    jitter = torch.rand(batch, num_frames, generator=generator, dtype=torch.float64) * width
    return (starts + jitter).long().clamp_(0, num_available - 1)


def fps_indices(
    timestamps_s: Tensor | np.ndarray | Sequence[float],
    target_fps: float,
    max_frames: int | None = None,
) -> Tensor:
    """Frames nearest to a regular time grid, for videos with constant or variable frame rate.

    The grid is ``t0, t0 + 1/target_fps, ...`` up to the last timestamp, with ``t0`` the first one.
    Working from real timestamps (:func:`mama.data.video.frame_timestamps`) rather than an assumed
    rate keeps the clip's timing right when the frame rate varies. When ``target_fps`` exceeds the
    video's rate, nearby grid points pick the same frame, so indices repeat (the clip still spans the
    right time at the right rate).

    Args:
        timestamps_s: ``(N,)`` presentation time in seconds of every frame, sorted ascending, N >= 1.
        target_fps: grid rate in frames per second, > 0.
        max_frames: if the grid has more points, keep this many spread uniformly over it (see
            :func:`uniform_indices`); None keeps all.

    Returns:
        int64 ``(T,)`` non-decreasing frame indices in ``[0, N)``, ``1 <= T <= max_frames``. On a tie
        between two frames the earlier one is taken.
    """
    import torch

    times = torch.as_tensor(np.asarray(timestamps_s, dtype=np.float64)).reshape(-1)
    if times.numel() == 0:
        raise ValueError("fps_indices needs at least one timestamp")
    if not target_fps > 0:
        raise ValueError(f"target_fps must be positive, got {target_fps}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if bool((times[1:] < times[:-1]).any()):
        raise ValueError("timestamps_s must be sorted ascending")

    span = float(times[-1] - times[0])
    # The epsilon keeps a grid point that lands exactly on the last frame despite float rounding.
    num_points = int(np.floor(span * target_fps + 1e-6)) + 1
    grid = times[0] + torch.arange(num_points, dtype=torch.float64) / target_fps
    # right[i]: first frame at or after grid[i]; the nearest frame is right[i] or the one before it.
    right = torch.searchsorted(times, grid).clamp_(max=times.numel() - 1)
    left = (right - 1).clamp_(min=0)
    take_left = (grid - times[left]) <= (times[right] - grid)
    indices = torch.where(take_left, left, right)
    if max_frames is not None and indices.numel() > max_frames:
        indices = indices[uniform_indices(indices.numel(), max_frames)]
    return indices
