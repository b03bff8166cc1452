"""Video decoding and encoding with PyAV.

Frames travel as uint8 RGB arrays of shape ``(T, H, W, 3)`` (channels last, as decoders produce them);
converting to the model layout ``(B, T, C, H, W)`` and to float is the transforms' job, not this
module's.

A "video" is either a video file or a folder of JPEG/PNG frame images (the frame-folder layout many
datasets ship). Frame indices are 0-based in presentation order, i.e. the order in which the decoder
outputs frames (for a folder: the sorted file names). Frames always come out display-oriented: a
rotation stored in the container (display matrix, as phones write it) is applied after decoding.
"""

from __future__ import annotations

import bisect
import math
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import av
import numpy as np
from av.video.reformatter import VideoReformatter

if TYPE_CHECKING:  # torch is imported where tensors are built: `mama keyframes` never loads it
    import torch

__all__ = [
    "VideoDecodeError",
    "VideoInfo",
    "count_frames",
    "decode_frames",
    "frame_timestamps",
    "nonref_skip_is_safe",
    "probe_video",
    "write_video",
]

# File suffixes recognised as frames inside a frame folder (case-insensitive).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})

# Seek only when it skips at least this many frames: a seek flushes the decoder and restarts at a
# keyframe, which costs about as much as decoding a handful of frames.
_MIN_SEEK_SKIP = 16
# Scanning packets for the seek plan reads the whole file (no decoding); below this largest wanted
# index, plain sequential decoding is cheap enough that the scan is not worth it.
_MIN_INDEX_FOR_SEEK = 2 * _MIN_SEEK_SKIP


class VideoDecodeError(ValueError):
    """A video file is missing, has no video stream, or cannot be decoded. The message names the file."""


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` learns about a video.

    Attributes:
        path: the video file or frame folder.
        num_frames: number of frames (container header count unless probed exactly; for a folder, the
            number of images).
        fps: average frames per second, or None when unknown (always None for a frame folder).
        duration_s: duration in seconds, or None when unknown (always None for a frame folder).
        height, width: frame size in pixels in display orientation, i.e. after applying ``rotation``.
        rotation: clockwise rotation in degrees (0, 90, 180 or 270) applied to the stored frames for
            display; the same convention as the legacy ``rotate`` tag (a portrait phone video is 90).
            Always 0 for a frame folder (an image's own orientation, if FFmpeg reports one, is already
            applied to its height and width).
    """

    path: Path
    num_frames: int
    fps: float | None
    duration_s: float | None
    height: int
    width: int
    rotation: int


def _natural_key(name: str) -> list[int | str]:
    """Sort key comparing digit runs as numbers, so ``frame_2.jpg`` sorts before ``frame_10.jpg``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _frame_images(folder: Path) -> list[Path]:
    """The JPEG/PNG images of a frame folder in frame order, or raise VideoDecodeError if there are none.

    Names are compared with digit runs as numbers; for zero-padded names (the usual ``%06d.jpg``) this is
    plain lexicographic order.
    """
    images = sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
        key=lambda p: _natural_key(p.name),
    )
    if not images:
        raise VideoDecodeError(f"{folder}: frame folder has no JPEG/PNG images")
    return images


def open_video(path: Path) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
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


def _tag_rotation(stream: av.video.stream.VideoStream) -> int:
    """Clockwise degrees from a legacy ``rotate`` metadata tag (some containers still carry it), else 0."""
    try:
        return round(float(stream.metadata.get("rotate", "0")) / 90) * 90 % 360
    except ValueError:
        return 0


def _frame_rotation(frame: av.VideoFrame, fallback: int) -> int:
    """Clockwise display rotation of ``frame`` in {0, 90, 180, 270}.

    PyAV reports the display matrix as a counter-clockwise angle in [-180, 180]; the clockwise
    convention matches the legacy tag. Angles that are not multiples of 90 are rounded to the nearest
    one (players do the same), flips in the matrix are ignored. Without a display matrix on the frame,
    ``fallback`` (the stream's tag) applies.
    """
    ccw = frame.rotation
    if ccw == 0:
        return fallback
    return round(-ccw / 90) * 90 % 360


def _short_side_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(H, W) with the shorter side equal to ``short_side`` and the aspect ratio kept (rounded)."""
    if height <= width:
        return short_side, max(1, math.floor(width * short_side / height + 0.5))
    return max(1, math.floor(height * short_side / width + 0.5)), short_side


def _frame_to_rgb(
    frame: av.VideoFrame,
    size: tuple[int, int] | None,
    short_side: int | None,
    tag_rotation: int,
    reformatter: VideoReformatter,
) -> np.ndarray:
    """Convert, resize (by libswscale, so the full-size RGB frame never exists) and rotate one frame.

    ``reformatter`` is shared by all frames of a decode: ``frame.to_ndarray(format=...)`` builds a new
    swscale context per frame, which can cost more than decoding it (full decodes at 640x360 ran 3x
    slower that way in benchmarks/decode.py).

    Returns:
        uint8 array ``(H, W, 3)`` in display orientation; ``size`` is in display orientation too.
    """
    rotation = _frame_rotation(frame, tag_rotation)
    transposed = rotation in (90, 270)
    resize: dict[str, int] = {}
    if size is not None:
        # swscale works on the stored frame, whose axes are swapped relative to the display for 90/270.
        height, width = (size[1], size[0]) if transposed else (size[0], size[1])
        resize = {"height": int(height), "width": int(width)}
    elif short_side is not None:
        height, width = _short_side_size(frame.height, frame.width, short_side)
        resize = {"height": height, "width": width}
    rgb: np.ndarray = reformatter.reformat(frame, format="rgb24", **resize).to_ndarray()
    if rotation:
        # np.rot90 turns counter-clockwise for positive k, the display rotation is clockwise.
        rgb = np.ascontiguousarray(np.rot90(rgb, k=-rotation // 90, axes=(0, 1)))
    return rgb


def _decode_image(image: Path, size: tuple[int, int] | None, short_side: int | None) -> np.ndarray:
    """Decode one frame image of a frame folder with PyAV; ``(H, W, 3)`` uint8 RGB."""
    try:
        with av.open(str(image), mode="r") as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{image}: frame image has no picture")
            frame = next(iter(container.decode(container.streams.video[0])), None)
            if frame is None:
                raise VideoDecodeError(f"{image}: frame image is empty or corrupt")
            return _frame_to_rgb(frame, size, short_side, 0, VideoReformatter())
    except (av.FFmpegError, OSError) as err:
        raise VideoDecodeError(f"{image}: cannot decode frame image: {err}") from err


def _check_resize_args(path: Path, size: tuple[int, int] | None, short_side: int | None) -> None:
    if size is not None and short_side is not None:
        raise ValueError(f"{path}: pass either size or short_side, not both")
    if size is not None and (int(size[0]) < 1 or int(size[1]) < 1):
        raise ValueError(f"{path}: size must be positive, got {size}")
    if short_side is not None and short_side < 1:
        raise ValueError(f"{path}: short_side must be positive, got {short_side}")


def _output_size(info: VideoInfo, size: tuple[int, int] | None, short_side: int | None) -> tuple[int, int]:
    """Display (H, W) that :func:`decode_frames` returns for a video described by ``info``."""
    if size is not None:
        return int(size[0]), int(size[1])
    if short_side is not None:
        return _short_side_size(info.height, info.width, short_side)
    return info.height, info.width


def probe_video(path: str | os.PathLike[str], exact: bool = False) -> VideoInfo:
    """Frame count, rate, duration, display size and rotation of a video file or frame folder.

    Cheap: reads the container header and decodes only the first frame (PyAV exposes the display
    matrix on decoded frames only). With ``exact=True`` every frame is decoded and counted (what
    :func:`decode_frames` can deliver, even if the header is wrong); when the header has no frame count
    (e.g. WebM), packets are counted without decoding.

    Raises:
        VideoDecodeError: the path is missing, has no video stream, or is corrupt.
    """
    path = Path(path)
    if path.is_dir():
        images = _frame_images(path)
        first_image = _decode_image(images[0], None, None)
        return VideoInfo(path, len(images), None, None, first_image.shape[0], first_image.shape[1], 0)

    container, stream = open_video(path)
    try:
        first = next(iter(container.decode(stream)), None)
        if first is None:
            raise VideoDecodeError(f"{path}: video stream has no decodable frames")
        rotation = _frame_rotation(first, _tag_rotation(stream))
        # Read everything from the stream before closing: its fields point into the container.
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        if stream.duration is not None and stream.time_base is not None:
            duration_s: float | None = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration_s = container.duration / av.time_base
        else:
            duration_s = None
        num_frames = int(stream.frames)
        if num_frames <= 0 and not exact:
            container.seek(0)
            num_frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
    except (av.FFmpegError, OSError) as err:
        raise VideoDecodeError(f"{path}: corrupt video: {err}") from err
    finally:
        container.close()
    if exact:
        # A fresh decoder: frame threading cannot be switched on once the probing decoder is open.
        num_frames = count_frames(path, exact=True)

    height, width = first.height, first.width
    if rotation in (90, 270):
        height, width = width, height
    return VideoInfo(path, num_frames, fps, duration_s, height, width, rotation)


@dataclass(frozen=True)
class _PacketIndex:
    """Where the frames of a video stream are, from demuxing its packets (no decoding).

    Attributes:
        pts: (N,) presentation timestamps of the frames in stream time base, sorted; frame i has pts[i].
        keyframes: sorted frame indices (presentation order) of the keyframes.
        reliable: every packet had a unique pts and none was marked discard/corrupt, so the pts -> index
            mapping matches the decoder's output order and seeking may be used.
    """

    pts: list[int]
    keyframes: list[int]
    reliable: bool


def _scan_packets(path: Path) -> tuple[_PacketIndex, Fraction]:
    """Demux every packet of the first video stream of ``path``; returns the index and the time base."""
    container, stream = open_video(path)
    # Read before closing: the stream's fields point into the container.
    time_base = stream.time_base or Fraction(1, 1)
    packets: list[tuple[int, bool]] = []
    reliable = True
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue  # the demuxer's end-of-stream flush packet
            if packet.pts is None or packet.is_discard or packet.is_corrupt:
                # Such packets break the pts -> frame index mapping; decode sequentially instead.
                reliable = False
                continue
            packets.append((int(packet.pts), bool(packet.is_keyframe)))
    except (av.FFmpegError, OSError) as err:
        raise VideoDecodeError(f"{path}: corrupt video, demuxing failed: {err}") from err
    finally:
        container.close()
    pts = sorted(p for p, _ in packets)
    if len(set(pts)) != len(pts):
        reliable = False
    index_of = {p: i for i, p in enumerate(pts)}
    keyframes = sorted(index_of[p] for p, is_key in packets if is_key)
    return _PacketIndex(pts, keyframes, reliable), time_base


def frame_timestamps(path: str | os.PathLike[str]) -> torch.Tensor:
    """Presentation time in seconds of every frame of a video file, from packet timestamps.

    Only demuxes (no decoding), so it is cheap even for long videos; use it with
    :func:`mama.data.sampling.fps_indices` for variable-frame-rate videos.

    Returns:
        float64 tensor ``(N,)``, sorted; entry i is the time of frame index i.

    Raises:
        VideoDecodeError: missing/corrupt file, no video stream, or a frame folder (frames without
            timestamps).
    """
    path = Path(path)
    if path.is_dir():
        raise VideoDecodeError(f"{path}: a frame folder has no timestamps; sample it by index")
    import torch

    index, time_base = _scan_packets(path)
    if not index.pts:
        raise VideoDecodeError(f"{path}: video stream has no frames")
    return torch.tensor(index.pts, dtype=torch.float64) * float(time_base)


def _plan_runs(targets: Sequence[int], keyframes: Sequence[int], min_skip: int) -> list[tuple[int | None, list[int]]]:
    """Split sorted unique frame indices into decode runs.

    Each run is ``(seek_to, run_targets)``: seek to keyframe index ``seek_to`` (None: keep decoding
    from where the previous run stopped, i.e. the start of the file for the first run), then decode
    forward through ``run_targets``. A new run starts when the keyframe at or before a target lies at
    least ``min_skip`` frames past the decoder's position, so every seek skips real work.
    """
    runs: list[tuple[int | None, list[int]]] = [(None, [])]
    position = 0  # index of the next frame sequential decoding would output
    for target in targets:
        slot = bisect.bisect_right(keyframes, target) - 1
        if slot >= 0 and keyframes[slot] - position >= min_skip:
            runs.append((keyframes[slot], []))
        runs[-1][1].append(target)
        position = target + 1
    return [run for run in runs if run[1]]


class _SeekMismatch(Exception):
    """The decoder's frames did not line up with the packet index; decode sequentially instead."""


# Codecs whose "non-reference" frames (what skip_frame = NONREF drops) are never referenced: H.264
# (nal_ref_idc = 0) and the MPEG video codecs (B-pictures).
_NONREF_SAFE_CODECS = frozenset({"h264", "mpeg1video", "mpeg2video", "mpeg4"})


def nonref_skip_is_safe(codec_name: str, extradata: bytes | None) -> bool:
    """Whether dropping the frames FFmpeg calls non-reference can never change another frame.

    For HEVC, FFmpeg drops *sub-layer* non-reference pictures (TRAIL_N, RASL_N, ...), which pictures of
    a higher temporal sub-layer may still reference (H.265 7.4.2.2): only a stream with one temporal
    layer, as its ``hvcC`` record declares (numTemporalLayers = 1; 0 means unknown), is safe. Other
    codecs (VP9, AV1, ...) are never skipped.
    """
    if codec_name in _NONREF_SAFE_CODECS:
        return True
    if codec_name == "hevc" and extradata and len(extradata) >= 23 and extradata[0] == 1:  # hvcC, version 1
        return (extradata[21] >> 3) & 0b111 == 1
    return False


def _decode_with_seeks(
    path: Path,
    index: _PacketIndex,
    targets: list[int],
    size: tuple[int, int] | None,
    short_side: int | None,
) -> tuple[dict[int, np.ndarray], int]:
    """Decode the frames ``targets`` (sorted, unique, in range) using seeks; returns them and the count
    of frames the decoder output.

    Between seeks, a packet whose frame is not wanted is decoded with ``skip_frame = NONREF`` (where
    :func:`nonref_skip_is_safe`): if no other frame references it (the non-reference B-frames, about half the frames of a camera clip
    with 3 B-frames), the decoder drops it without decoding, which cannot change any other frame.
    FFmpeg's frame threads copy ``skip_frame`` from the caller's context with each packet, so it
    applies per packet. On the 1080p/4K camera clips of benchmarks/decode.py --camera this cut
    decoding 12 frames by about a third, and the frames stayed identical to a full decode's.
    """
    index_of = {p: i for i, p in enumerate(index.pts)}
    kept: dict[int, np.ndarray] = {}
    num_decoded = 0
    container, stream = open_video(path)
    stream.thread_type = "AUTO"
    codec_context = stream.codec_context
    may_skip = nonref_skip_is_safe(codec_context.name, codec_context.extradata)
    tag_rotation = _tag_rotation(stream)
    reformatter = VideoReformatter()
    try:
        for seek_to, run_targets in _plan_runs(targets, index.keyframes, _MIN_SEEK_SKIP):
            if seek_to is not None:
                # Seek by the keyframe's pts, not its dts: the MP4 demuxer compares presentation times
                # (seeking to the dts lands one GOP early once B-frames delay presentation).
                container.seek(index.pts[seek_to], backward=True, any_frame=False, stream=stream)
            first_index = seek_to or 0
            wanted = set(run_targets)
            last = run_targets[-1]
            run_done = False
            for packet in container.demux(stream):
                # The flush packet at the end (no pts) and any packet off the index are decoded normally.
                packet_idx = index_of.get(packet.pts) if packet.pts is not None else None
                skip: Literal["NONREF", "DEFAULT"] = (
                    "NONREF" if may_skip and packet_idx is not None and packet_idx not in wanted else "DEFAULT"
                )
                if codec_context.skip_frame != skip:
                    codec_context.skip_frame = skip
                for frame in packet.decode():
                    num_decoded += 1
                    frame_idx = index_of.get(frame.pts) if frame.pts is not None else None
                    if frame_idx is None:
                        raise _SeekMismatch
                    if frame_idx < first_index:
                        # Leading pictures of an open GOP reference the previous GOP: skipped, never kept.
                        continue
                    if frame_idx > run_targets[0] and run_targets[0] not in kept:
                        raise _SeekMismatch  # the seek landed after the target
                    if frame_idx in wanted:
                        kept[frame_idx] = _frame_to_rgb(frame, size, short_side, tag_rotation, reformatter)
                    if frame_idx >= last:
                        run_done = True
                        break
                if run_done:
                    break
            if not wanted <= kept.keys():
                raise _SeekMismatch
    finally:
        container.close()
    return kept, num_decoded


def _decode_sequential(
    path: Path,
    wanted: set[int] | None,
    size: tuple[int, int] | None,
    short_side: int | None,
) -> tuple[dict[int, np.ndarray], int]:
    """Decode from the start, keeping the frames in ``wanted`` (None: all); stops after the largest
    wanted index. Returns the kept frames by index and the number of frames decoded."""
    last_needed = max(wanted) if wanted else -1
    kept: dict[int, np.ndarray] = {}
    num_decoded = 0
    container, stream = open_video(path)
    # Frame threading pays off for real (large) videos and costs nothing for tiny ones.
    stream.thread_type = "AUTO"
    tag_rotation = _tag_rotation(stream)
    reformatter = VideoReformatter()
    try:
        for frame_idx, frame in enumerate(container.decode(stream)):
            num_decoded = frame_idx + 1
            if wanted is None or frame_idx in wanted:
                kept[frame_idx] = _frame_to_rgb(frame, size, short_side, tag_rotation, reformatter)
            if wanted is not None and frame_idx >= last_needed:
                break
    except (av.FFmpegError, OSError) as err:
        raise VideoDecodeError(f"{path}: corrupt video, decoding failed after {num_decoded} frames: {err}") from err
    finally:
        container.close()
    return kept, num_decoded


def _decode_video(
    path: Path,
    indices: list[int] | None,
    size: tuple[int, int] | None,
    short_side: int | None,
) -> tuple[torch.Tensor, int]:
    """:func:`decode_frames` for a video file; also returns how many frames were decoded (for tests)."""
    import torch

    kept: dict[int, np.ndarray] | None
    if indices is None:
        kept, num_decoded = _decode_sequential(path, None, size, short_side)
        if not kept:
            raise VideoDecodeError(f"{path}: video stream has no decodable frames")
        return torch.from_numpy(np.stack([kept[i] for i in range(len(kept))])), num_decoded

    targets = sorted(set(indices))
    kept = None
    num_decoded = 0
    if targets[-1] >= _MIN_INDEX_FOR_SEEK:
        packet_index, _ = _scan_packets(path)
        if targets[-1] >= len(packet_index.pts):
            missing = [i for i in targets if i >= len(packet_index.pts)]
            raise VideoDecodeError(
                f"{path}: frame indices {missing} out of range (video has {len(packet_index.pts)} frames)"
            )
        if packet_index.reliable and packet_index.keyframes:
            try:
                kept, num_decoded = _decode_with_seeks(path, packet_index, targets, size, short_side)
            except (_SeekMismatch, av.FFmpegError, OSError):
                # Correctness over speed: odd files (broken timestamps, failed seeks) decode from the start.
                kept = None
    if kept is None:
        kept, num_decoded = _decode_sequential(path, set(targets), size, short_side)
    missing = [i for i in targets if i not in kept]
    if missing:
        raise VideoDecodeError(f"{path}: frame indices {missing} out of range (video has {num_decoded} frames)")
    return torch.from_numpy(np.stack([kept[i] for i in indices])), num_decoded


def decode_frames(
    path: str | os.PathLike[str],
    size: tuple[int, int] | None = None,
    indices: Sequence[int] | None = None,
    short_side: int | None = None,
) -> torch.Tensor:
    """Decode frames of a video file or frame folder as display-oriented RGB.

    Sparse indices in long videos are served by seeking to the keyframe at or before each wanted frame
    (located by demuxing packet timestamps, without decoding) instead of decoding everything before it,
    and unwanted frames that no other frame references (non-reference B-frames) are not decoded at
    all; the frames are identical to those of a full sequential decode. Files whose timestamps do not allow
    this are decoded sequentially, stopping after the largest wanted index.

    Args:
        path: video file, or folder of JPEG/PNG frame images (decoded by PyAV in file-name order).
        size: ``(H, W)`` in pixels (display orientation) to resize every frame to exactly, or None.
        indices: 0-based frame indices in presentation order to return, in the order given (repeats
            allowed, so samplers may pad short clips); None returns every frame.
        short_side: resize so the shorter side has this many pixels, keeping the aspect ratio (the
            longer side is rounded to the nearest pixel). Mutually exclusive with ``size``. Both resizes
            run in libswscale while converting to RGB, so full-size RGB frames are never materialised.

    Returns:
        uint8 tensor ``(T, H, W, 3)`` with ``T = len(indices)`` (or the number of frames).

    Raises:
        VideoDecodeError: the path is missing, has no video stream, is corrupt, has no frames, or an
            index is negative or past the last frame. The message names the file.
        ValueError: both ``size`` and ``short_side`` given, or a non-positive size.
    """
    import torch

    path = Path(path)
    _check_resize_args(path, size, short_side)
    if indices is not None:
        indices = [int(i) for i in indices]
        if any(i < 0 for i in indices):
            raise VideoDecodeError(f"{path}: negative frame index in {indices}")
        if not indices:
            # No frame requested: the shape still has to be right for stacking with other clips.
            height, width = _output_size(probe_video(path), size, short_side)
            return torch.empty((0, height, width, 3), dtype=torch.uint8)

    if path.is_dir():
        images = _frame_images(path)
        wanted = range(len(images)) if indices is None else indices
        missing = sorted({i for i in wanted if i >= len(images)})
        if missing:
            raise VideoDecodeError(f"{path}: frame indices {missing} out of range (folder has {len(images)} frames)")
        decoded = {i: _decode_image(images[i], size, short_side) for i in sorted(set(wanted))}
        shapes = {frame.shape for frame in decoded.values()}
        if len(shapes) > 1:
            raise VideoDecodeError(f"{path}: frame images differ in size {sorted(shapes)}; pass size= to resize")
        return torch.from_numpy(np.stack([decoded[i] for i in wanted]))

    frames, _ = _decode_video(path, indices, size, short_side)
    return frames


def count_frames(path: str | os.PathLike[str], exact: bool = False) -> int:
    """Number of frames of the first video stream of ``path`` (or of images in a frame folder).

    The container header's count is used when present (exact for MP4); with ``exact=True`` or when the
    header has none (e.g. WebM), every frame is decoded and counted.

    Raises:
        VideoDecodeError: as for :func:`decode_frames`.
    """
    path = Path(path)
    if path.is_dir():
        return len(_frame_images(path))
    container, stream = open_video(path)
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
            options: dict[str, object] = {"crf": str(crf), "preset": preset}
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
