"""Image transforms for decoded clips, in plain torch (no torchvision, no PIL).

Inputs are uint8 frames channels-last ``(..., H, W, 3)`` as :func:`mama.data.video.decode_frames`
returns them, with any leading dimensions (a clip ``(T, H, W, 3)`` or a batch ``(B, T, H, W, 3)``).
Geometry transforms keep that layout and dtype; :func:`normalize` is the last step and turns frames
into float channels-first ``(..., 3, H, W)``, the model layout ``(B, T, C, H, W)``.

A crop larger than the frame raises ValueError instead of padding: padding would feed the model
borders it never sees at test time. Resize first with :func:`resize_short_side`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CLIP_MEAN", "CLIP_STD", "center_crop", "normalize", "random_crop", "resize_short_side"]

# Per-channel RGB statistics of OpenAI CLIP's training images, on the [0, 1] scale.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_frames(frames: Tensor, name: str) -> None:
    if frames.dim() < 3 or frames.shape[-1] != 3:
        raise ValueError(f"{name}: frames must have shape (..., H, W, 3), got {tuple(frames.shape)}")


def resize_short_side(
    frames: Tensor,
    size: int,
    mode: Literal["bilinear", "bicubic"] = "bicubic",
) -> Tensor:
    """Resize so the shorter side is ``size`` pixels, keeping the aspect ratio.

    Antialiased interpolation (as PIL does, so downscaling does not alias), rounded to the nearest
    integer and clamped back to uint8 (bicubic overshoots at edges).

    Args:
        frames: uint8 ``(..., H, W, 3)``.
        size: target length of the shorter side; the longer side becomes ``round(long * size / short)``.
        mode: interpolation kernel; bicubic matches CLIP's preprocessing.

    Returns:
        uint8 ``(..., H', W', 3)`` with ``min(H', W') == size``; ``frames`` itself when already there.
    """
    _check_frames(frames, "resize_short_side")
    if frames.dtype != torch.uint8:
        raise TypeError(f"resize_short_side: frames must be uint8, got {frames.dtype}")
    if size < 1:
        raise ValueError(f"resize_short_side: size must be positive, got {size}")
    *lead, height, width, _ = frames.shape
    if min(height, width) == size:
        return frames
    if height <= width:
        out_hw = (size, max(1, int(width * size / height + 0.5)))
    else:
        out_hw = (max(1, int(height * size / width + 0.5)), size)
    flat = frames.reshape(-1, height, width, 3).permute(0, 3, 1, 2).float()  # (N, 3, H, W)
    resized = F.interpolate(flat, size=out_hw, mode=mode, align_corners=False, antialias=True)
    resized = resized.round_().clamp_(0, 255).to(torch.uint8)
    return resized.permute(0, 2, 3, 1).reshape(*lead, *out_hw, 3).contiguous()  # (..., H', W', 3)


def _crop_size(size: int | tuple[int, int]) -> tuple[int, int]:
    crop = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if crop[0] < 1 or crop[1] < 1:
        raise ValueError(f"crop size must be positive, got {size}")
    return crop


def _check_crop(frames: Tensor, crop: tuple[int, int], name: str) -> None:
    _check_frames(frames, name)
    height, width = frames.shape[-3], frames.shape[-2]
    if crop[0] > height or crop[1] > width:
        raise ValueError(
            f"{name}: crop {crop[0]}x{crop[1]} is larger than the {height}x{width} frame; "
            "resize first (resize_short_side)"
        )


def center_crop(frames: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Crop the centre ``(h, w)`` (or ``size x size``) of every frame.

    When the margin is odd the extra pixel is left at the bottom/right (offset ``(H - h) // 2``).

    Args:
        frames: ``(..., H, W, 3)``, any dtype.
        size: crop ``(h, w)`` or a square side; must fit inside the frame.

    Returns:
        ``(..., h, w, 3)``, a view of ``frames``.

    Raises:
        ValueError: the crop is larger than the frame.
    """
    crop = _crop_size(size)
    _check_crop(frames, crop, "center_crop")
    top = (frames.shape[-3] - crop[0]) // 2
    left = (frames.shape[-2] - crop[1]) // 2
    return frames[..., top : top + crop[0], left : left + crop[1], :]


def random_crop(frames: Tensor, size: int | tuple[int, int], generator: torch.Generator) -> Tensor:
    """Crop one random ``(h, w)`` window, the same for every frame so a clip stays temporally coherent.

    Args:
        frames: ``(..., H, W, 3)``, any dtype; all leading dimensions share the window.
        size: crop ``(h, w)`` or a square side; must fit inside the frame.
        generator: source of the offsets, for reproducible augmentation.

    Returns:
        ``(..., h, w, 3)``, a view of ``frames``.

    Raises:
        ValueError: the crop is larger than the frame.
    """
    crop = _crop_size(size)
    _check_crop(frames, crop, "random_crop")
    top = int(torch.randint(0, frames.shape[-3] - crop[0] + 1, (1,), generator=generator))
    left = int(torch.randint(0, frames.shape[-2] - crop[1] + 1, (1,), generator=generator))
    return frames[..., top : top + crop[0], left : left + crop[1], :]


def normalize(
    frames: Tensor,
    mean: float | Sequence[float] = CLIP_MEAN,
    std: float | Sequence[float] = CLIP_STD,
) -> Tensor:
    """Scale uint8 RGB to ``(x / 255 - mean) / std`` per channel and move channels first.

    Args:
        frames: uint8 ``(..., H, W, 3)``.
        mean, std: per-channel RGB statistics on the [0, 1] scale (a float applies to all channels).

    Returns:
        float32 ``(..., 3, H, W)``.
    """
    _check_frames(frames, "normalize")
    if frames.dtype != torch.uint8:
        raise TypeError(f"normalize: frames must be uint8, got {frames.dtype}")
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
    if mean_t.numel() not in (1, 3) or std_t.numel() not in (1, 3):
        raise ValueError(f"normalize: mean and std need 1 or 3 values, got {mean} and {std}")
    mean_t, std_t = mean_t.expand(3), std_t.expand(3)
    if bool((std_t <= 0).any()):
        raise ValueError(f"normalize: std must be positive, got {std}")
    # (..., H, W, 3) -> (..., 3, H, W) as a channels-last view: convolutions then run in channels-last
    # memory format, as they always have here. Computing the literal (x / 255 - mean) / std in place
    # (not folded into one multiply-add) keeps the result bit for bit: a last-bit change of the input
    # changes a 1500-step training trajectory as much as another seed would, and published runs must
    # stay reproducible.
    out = frames.movedim(-1, -3).float()
    mean_t, std_t = mean_t.to(out.device), std_t.to(out.device)
    return out.div_(255.0).sub_(mean_t[:, None, None]).div_(std_t[:, None, None])
