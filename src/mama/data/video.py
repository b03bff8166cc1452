"""Video decoding and encoding with PyAV.

Frames travel as uint8 RGB arrays of shape ``(T, H, W, 3)`` (channels last, as decoders produce them);
converting to the model layout ``(B, T, C, H, W)`` and to float is the transforms' job, not this
module's.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

__all__ = ["VideoDecodeError", "decode_frames", "count_frames", "write_video"]


class VideoDecodeError(ValueError):
    """A video file is missing, has no video stream, or cannot be decoded. The message names the file."""


def _open_video(path: Path) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    """Open ``path`` and return the container and its first video stream, or raise VideoDecodeError."""
    if not path.is_file():
        raise VideoDecodeError(f"{path}: video file not found")
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, OSError) as err:
        raise VideoDecodeError(f"{path}: cannot open video: {err}") from err
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{path}: file has no video stream")
    return container, container.streams.video[0]


def decode_frames(
    path: str | os.PathLike[str],
    size: tuple[int, int] | None = None,
    indices: Sequence[int] | None = None,
) -> torch.Tensor:
    """Decode the frames of a video file as RGB.

    Args:
        path: video file.
        size: ``(H, W)`` in pixels to resize every frame to (by libswscale), or None for the native
            size.
        indices: 0-based frame indices in decode order to return, in the order given (repeats
            allowed, so samplers may pad short clips); None returns every frame. Decoding runs
            sequentially and stops after the largest requested index.

    Returns:
        uint8 tensor ``(T, H, W, 3)`` with ``T = len(indices)`` (or the number of frames).

    Raises:
        VideoDecodeError: the file is missing, has no video stream, is corrupt, has no frames, or an
            index is negative or past the last frame.
    """
    path = Path(path)
    wanted: set[int] | None = None
    if indices is not None:
        indices = [int(i) for i in indices]
        if any(i < 0 for i in indices):
            raise VideoDecodeError(f"{path}: negative frame index in {indices}")
        wanted = set(indices)
    last_needed = max(wanted) if wanted else -1

    container, stream = _open_video(path)
    # Frame threading pays off for real (large) videos and costs nothing for tiny ones.
    stream.thread_type = "AUTO"
    kept: dict[int, np.ndarray] = {}
    all_frames: list[np.ndarray] = []
    num_decoded = 0
    resize = {} if size is None else {"height": int(size[0]), "width": int(size[1])}
    try:
        if wanted is None or wanted:
            for frame_idx, frame in enumerate(container.decode(stream)):
                num_decoded = frame_idx + 1
                if wanted is None:
                    all_frames.append(frame.to_ndarray(format="rgb24", **resize))
                    continue
                if frame_idx in wanted:
                    kept[frame_idx] = frame.to_ndarray(format="rgb24", **resize)
                if frame_idx >= last_needed:
                    break
        else:
            # No frame requested: the shape still has to be right for stacking with other clips.
            height = resize.get("height", stream.codec_context.height)
            width = resize.get("width", stream.codec_context.width)
            return torch.empty((0, height, width, 3), dtype=torch.uint8)
    except (av.FFmpegError, OSError) as err:
        raise VideoDecodeError(f"{path}: corrupt video, decoding failed after {num_decoded} frames: {err}") from err
    finally:
        container.close()

    if wanted is None:
        if not all_frames:
            raise VideoDecodeError(f"{path}: video stream has no decodable frames")
        return torch.from_numpy(np.stack(all_frames))
    missing = sorted(wanted - kept.keys())
    if missing:
        raise VideoDecodeError(
            f"{path}: frame indices {missing} out of range (video has {num_decoded} frames)"
        )
    return torch.from_numpy(np.stack([kept[i] for i in indices]))


def count_frames(path: str | os.PathLike[str], exact: bool = False) -> int:
    """Number of frames of the first video stream of ``path``.

    The container header's count is used when present (exact for MP4); with ``exact=True`` or when the
    header has none (e.g. WebM), every frame is decoded and counted.

    Raises:
        VideoDecodeError: as for :func:`decode_frames`.
    """
    path = Path(path)
    container, stream = _open_video(path)
    try:
        if stream.frames > 0 and not exact:
            return int(stream.frames)
        stream.thread_type = "AUTO"
        num_frames = sum(1 for _ in container.decode(stream))
    except (av.FFmpegError, OSError) as err:
        raise VideoDecodeError(f"{path}: corrupt video: {err}") from err
    finally:
        container.close()
    return num_frames


def write_video(
    path: str | os.PathLike[str],
    frames: np.ndarray,
    fps: float,
    crf: int = 18,
    preset: str = "medium",
    deterministic: bool = True,
) -> Path:
    """Encode RGB frames as H.264 (libx264, yuv420p) into ``path`` atomically.

    The file is written under a temporary name in the same folder and renamed into place, so an
    interrupted run never leaves a truncated video behind.

    Args:
        path: output file; its suffix picks the container (e.g. ``.mp4``).
        frames: uint8 array ``(T, H, W, 3)`` RGB, T >= 1; H and W must be even (yuv420p halves them).
        fps: frames per second.
        crf: x264 constant rate factor (lower = higher quality); 18 keeps flat colours close to the input.
        preset: x264 speed preset.
        deterministic: make the bytes a function of the input alone. libx264 then runs single-threaded
            and without its SIMD code: with SIMD, the PyAV 18 wheel's libx264 gave different bytes for
            the same frames in about 1% of encodes (depending on earlier encodes in the process), and
            threads make the output depend on timing. Costs about 1.4x encode time at 64x64.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"{path}: frames must have shape (T>=1, H, W, 3), got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"{path}: frames must be uint8, got {frames.dtype}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"{path}: H.264 yuv420p needs even height and width, got {height}x{width}")
    if not fps > 0:
        raise ValueError(f"{path}: fps must be positive, got {fps}")

    rate = Fraction(fps).limit_denominator(1001)
    # Keep the real suffix so the muxer is inferred from it; the leading dot hides the partial file.
    tmp_path = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.tmp{path.suffix}")
    try:
        with av.open(str(tmp_path), mode="w") as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.width = width
            stream.height = height
            stream.pix_fmt = "yuv420p"
            options = {"crf": str(crf), "preset": preset}
            if deterministic:
                # Parallelism belongs to the caller (one file per process), not to the encoder.
                stream.codec_context.thread_count = 1
                options["x264-params"] = "asm=0"
            stream.options = options
            for frame_idx, rgb in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                frame.pts = frame_idx
                frame.time_base = 1 / rate
                for packet in stream.encode(frame.reformat(format="yuv420p")):
                    container.mux(packet)
            # Flush: x264 buffers frames for lookahead, without this the tail of the clip is lost.
            for packet in stream.encode(None):
                container.mux(packet)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path
