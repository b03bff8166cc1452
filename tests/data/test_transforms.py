"""Tests for mama.data.transforms: torch-only resize, crops and normalisation of uint8 frames."""

from __future__ import annotations

import pytest
import torch

from mama.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    center_crop,
    normalize,
    random_crop,
    resize_short_side,
)


def _frames(*lead: int, height: int = 48, width: int = 64) -> torch.Tensor:
    """uint8 (*lead, H, W, 3) with row index in R, column index in G, constant B: positions are readable."""
    rows = torch.arange(height).view(height, 1).expand(height, width)
    cols = torch.arange(width).view(1, width).expand(height, width)
    image = torch.stack([rows, cols, torch.full_like(rows, 7)], dim=-1).to(torch.uint8)
    return image.expand(*lead, height, width, 3).contiguous()


@pytest.mark.parametrize(("height", "width", "expected"), [(48, 64, (24, 32)), (64, 48, (32, 24)), (47, 63, (24, 32))])
def test_resize_short_side_shape_and_aspect(height: int, width: int, expected: tuple[int, int]) -> None:
    frames = _frames(2, 3, height=height, width=width)
    out = resize_short_side(frames, 24)
    assert out.shape == (2, 3, *expected, 3)
    assert out.dtype == torch.uint8
    assert resize_short_side(frames[0, 0], 24).shape == (*expected, 3)  # a single image works too
    assert resize_short_side(frames, min(height, width)) is frames  # already there: untouched


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_resize_short_side_values(mode: str) -> None:
    flat = torch.full((2, 40, 60, 3), 200, dtype=torch.uint8)
    assert torch.equal(resize_short_side(flat, 20, mode=mode), torch.full((2, 20, 30, 3), 200, dtype=torch.uint8))
    # antialiasing: a 1-pixel checkerboard averages to grey instead of aliasing to black or white
    checker = ((torch.arange(40).view(40, 1) + torch.arange(60).view(1, 60)) % 2 * 255).to(torch.uint8)
    small = resize_short_side(checker[..., None].expand(40, 60, 3), 10, mode=mode)
    assert (small[2:-2, 2:-2].float() - 127.5).abs().max() < 20
    # gradients survive: the red channel (row index) still increases down the image
    ramp = resize_short_side(_frames(height=48, width=64), 24, mode=mode)
    assert bool((ramp[1:, :, 0].int() >= ramp[:-1, :, 0].int()).all())
    with pytest.raises(TypeError, match="uint8"):
        resize_short_side(flat.float(), 20)


def test_center_crop_position() -> None:
    frames = _frames(2, 3)  # 48 x 64
    out = center_crop(frames, 32)
    assert out.shape == (2, 3, 32, 32, 3)
    assert (int(out[0, 0, 0, 0, 0]), int(out[0, 0, 0, 0, 1])) == (8, 16)  # top-left = row 8, col 16
    tall = center_crop(frames, (45, 10))  # odd margin: the extra pixel stays at the bottom
    assert (int(tall[0, 0, 0, 0, 0]), int(tall[0, 0, 0, 0, 1])) == (1, 27)
    assert torch.equal(center_crop(frames, (48, 64)), frames)
    with pytest.raises(ValueError, match="larger than the 48x64 frame"):
        center_crop(frames, 50)


def test_random_crop_same_window_for_the_clip_and_deterministic() -> None:
    frames = _frames(4, 6)
    out = random_crop(frames, (20, 30), torch.Generator().manual_seed(0))
    assert out.shape == (4, 6, 20, 30, 3)
    top, left = int(out[0, 0, 0, 0, 0]), int(out[0, 0, 0, 0, 1])
    assert 0 <= top <= 48 - 20 and 0 <= left <= 64 - 30
    assert torch.equal(out, frames[..., top : top + 20, left : left + 30, :])  # every frame, one window
    again = random_crop(frames, (20, 30), torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    crops = [random_crop(frames, 16, torch.Generator().manual_seed(seed)) for seed in range(20)]
    corners = {tuple(crop[0, 0, 0, 0, :2].tolist()) for crop in crops}
    assert len(corners) > 10  # offsets actually vary with the seed
    with pytest.raises(ValueError, match="resize first"):
        random_crop(frames, (49, 10), torch.Generator())


def test_normalize_known_values() -> None:
    frames = torch.tensor([[[[0, 128, 255]]]], dtype=torch.uint8).expand(2, 4, 5, 3)  # (2, 4, 5, 3)
    out = normalize(frames)
    assert out.shape == (2, 3, 4, 5)
    assert out.dtype == torch.float32
    expected = [(value / 255 - m) / s for value, m, s in zip((0, 128, 255), CLIP_MEAN, CLIP_STD, strict=True)]
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor(expected), rtol=0, atol=1e-5)
    assert torch.equal(out[1, :, 3, 4], out[0, :, 0, 0])
    # scalar statistics and the (B, T, H, W, 3) -> (B, T, 3, H, W) layout
    video = torch.full((2, 3, 4, 5, 3), 255, dtype=torch.uint8)
    scaled = normalize(video, mean=0.5, std=0.25)
    assert scaled.shape == (2, 3, 3, 4, 5)
    assert torch.equal(scaled, torch.full_like(scaled, 2.0))
    # Bit for bit the literal formula on the permuted view (published training runs depend on it).
    pixels = torch.randint(0, 256, (2, 3, 4, 5, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    literal = pixels.permute(0, 1, 4, 2, 3).float().div_(255.0).sub_(0.5).div_(0.25)
    assert torch.equal(normalize(pixels, mean=0.5, std=0.25), literal)
    assert normalize(pixels, 0.5, 0.25).stride() == literal.stride()
    with pytest.raises(TypeError, match="uint8"):
        normalize(video.float())
    with pytest.raises(ValueError, match="1 or 3 values"):
        normalize(video, mean=(0.5, 0.5), std=0.25)
