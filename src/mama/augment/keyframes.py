"""Keyframes and the keyframe grid: the image MAMA's LVLM captioner sees for a video (method section 3).

The pipeline follows the authors' demo (``demo_lvlm.py`` with their vendored copy of
``video-keyframe-detector``), re-implemented to stream:

1. :func:`difference_signal`: every frame is converted to grayscale, blurred with a 9x9 Gaussian, and
   compared with the previous blurred frame; the value of frame ``t`` is the number of pixels where the
   saturating difference ``blur[t] - blur[t-1]`` (clipped at 0, OpenCV's ``cv2.subtract`` on uint8) is
   non-zero, i.e. the pixels that got *brighter*. Frame 0 gets 0.
2. :func:`find_peaks`: a degree-2 polynomial baseline is removed and the local maxima above
   ``min + threshold * (max - min)`` of the baseline-removed signal are the peaks.
3. :func:`choose_keyframes`: ``num`` keyframes spread evenly over the peaks; when there are fewer
   peaks than that, uniformly spaced other frames fill the gap (the authors' code failed there).
4. :func:`tile_grid` / :func:`keyframe_grid`: the keyframes tiled row-major in temporal order.

Memory does not grow with the video's length beyond one float per frame: the analysis pass decodes
frames one at a time, hands them to an analysis thread through a short queue, which converts each to a
reduced size (short side ``analysis_size``, scaled by libswscale while converting, so full-size RGB
frames never exist) and analyses them in small batches, keeping only the previous blurred frame; a second
pass decodes just the chosen frames at display size with :func:`mama.data.video.decode_frames`. The
9x9 blur is defined in source pixels, so on downscaled frames it shrinks by the same factor (see
:func:`_blur_taps`); at full resolution it is exactly the authors' kernel.

Known properties of the authors' measure, kept on purpose: a cut to a darker scene brightens few
pixels and may be missed; any 1-level flicker counts, so sensor noise or compression flicker that
reaches 10% of a cut's count turns into peaks at threshold 0.1 (the authors' demo value; the authors'
``demo_lvlm.py`` passes 0.6, their detector's CLI defaults to 0.3); and frame 0's placeholder 0 pulls
the baseline down at the start of short noisy clips, which can make frame 1 a peak.

Frames are ``(H, W, 3)`` uint8 RGB (channels last, as decoders produce them); frame indices are 0-based
in presentation order, the order in which the decoder outputs frames, as everywhere in :mod:`mama.data`.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import uuid
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from mama.data.sampling import uniform_indices_array
from mama.data.video import VideoDecodeError, decode_frames, open_video, probe_video

if TYPE_CHECKING:  # torch only where grids are built: `mama keyframes --json` never imports it
    from torch import Tensor

__all__ = [
    "Keyframes",
    "choose_keyframes",
    "difference_signal",
    "extract_keyframes",
    "find_peaks",
    "keyframe_grid",
    "save_image",
    "tile_grid",
]

# OpenCV's kernel for GaussianBlur(ksize=(9, 9), sigmaX=0): with sigma <= 0 it derives
# sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8 = 1.7 for ksize 9 (it has fixed tables only up to ksize 7).
_BLUR_KSIZE = 9
_BLUR_SIGMA = 0.3 * ((_BLUR_KSIZE - 1) * 0.5 - 1) + 0.8
_BLUR_TAPS = np.exp(-((np.arange(_BLUR_KSIZE) - _BLUR_KSIZE // 2) ** 2) / (2 * _BLUR_SIGMA**2))
_BLUR_TAPS = (_BLUR_TAPS / _BLUR_TAPS.sum()).astype(np.float32)

# OpenCV's fixed-point RGB -> gray weights (0.299, 0.587, 0.114 scaled by 2**14, rounded so they sum to
# 2**14); the authors' frames went through cv2.cvtColor(BGR2GRAY), which computes exactly this. Held as
# float32 for a BLAS product: every partial sum is an integer below 255 * 2**14 < 2**24, which float32
# represents exactly, so the product is exact in any summation order (and 2x faster than uint32 numpy).
_GRAY_WEIGHTS = np.array([4899, 9617, 1868], dtype=np.float32)
_GRAY_SHIFT = 14

# peakutils.baseline defaults (the authors call peakutils.baseline(y, 2)).
_BASELINE_DEGREE = 2
_BASELINE_MAX_ITER = 100
_BASELINE_TOL = 1e-3

# Decoded frames waiting for the analysis thread of _signal_of_file: enough to keep both threads busy,
# few enough that memory does not depend on the video (a 4K yuv420p frame is 12 MB).
_PIPELINE_DEPTH = 4

# Frames the analysis pass converts to gray, blurs and compares in one batch of numpy calls, and the most
# RGB bytes such a batch may hold (a few 64 px frames are 22 KB each; a full-size 4K frame is 25 MB, alone).
_ANALYSIS_BATCH = 32
_ANALYSIS_BATCH_BYTES = 1 << 20

# Frame folders are read through decode_frames in chunks of this many frames: each call lists the
# folder again, so one call per frame would cost O(N^2) directory reads.
_FOLDER_CHUNK = 64

# MJPEG quantiser scale for save_image (ffmpeg's ``-q:v``; 2 is near-lossless, about JPEG quality 90+).
# Without it the encoder runs its bit-rate control, which blurs a large grid badly.
_JPEG_QSCALE = 2
_FF_QP2LAMBDA = 118  # libavcodec's lambda per quantiser step


@dataclass(frozen=True)
class Keyframes:
    """Keyframes of one video.

    Attributes:
        video: the video file or frame folder.
        num_frames: number of frames decoded in the analysis pass (exact, not the container header).
        fps: average frame rate, or None when unknown (frame folders).
        peaks: sorted frame indices of the peaks of the difference signal (scene changes, big motion).
        keyframes: the chosen frame indices in temporal order (non-decreasing; distinct whenever the
            video has at least as many frames as keyframes were asked for).
    """

    video: Path
    num_frames: int
    fps: float | None
    peaks: list[int]
    keyframes: list[int]

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable dict: ``{"video": str, "num_frames", "fps", "peaks", "keyframes"}``."""
        return {
            "video": str(self.video),
            "num_frames": self.num_frames,
            "fps": self.fps,
            "peaks": list(self.peaks),
            "keyframes": list(self.keyframes),
        }


def _to_gray(rgb: np.ndarray) -> np.ndarray:
    """``(..., H, W, 3)`` uint8 RGB -> ``(..., H, W)`` uint8 luma, bit-exact with ``cv2.cvtColor`` (BGR2GRAY of BGR)."""
    weighted = rgb.astype(np.float32) @ _GRAY_WEIGHTS  # (..., H, W), exact integers (see _GRAY_WEIGHTS)
    weighted += 1 << (_GRAY_SHIFT - 1)
    weighted *= 1.0 / (1 << _GRAY_SHIFT)  # a power of two: exact
    return np.floor(weighted, out=weighted).astype(np.uint8)


def _blur_taps(scale: float) -> np.ndarray:
    """1-D Gaussian taps of the authors' 9x9 blur as seen at ``scale`` times the source resolution.

    At ``scale >= 1`` these are OpenCV's taps for ksize 9 (sigma 1.7). On a frame downscaled by
    ``scale`` the same blur measured in source pixels has sigma ``1.7 * scale`` and radius
    ``4 * scale`` (at least 1). Keeping the 9x9 kernel at 64 px instead would blur ~5.6x more of the
    picture than the authors did, flatten the texture that decides which pixels get brighter at a cut,
    and lose cuts to darker scenes (benchmarks/keyframes.py, two 640x360 videos: 13 of 21 cuts found at
    64 px with the fixed kernel, 17 of 21 with the scaled one, the same as at full resolution).
    """
    if scale >= 1.0:
        return _BLUR_TAPS
    half = max(1, round(_BLUR_KSIZE // 2 * scale))
    sigma = _BLUR_SIGMA * scale
    taps = np.exp(-(np.arange(-half, half + 1) ** 2) / (2 * sigma**2))
    return (taps / taps.sum()).astype(np.float32)


def _gaussian_blur(gray: np.ndarray, taps: np.ndarray = _BLUR_TAPS) -> np.ndarray:
    """Separable Gaussian blur of ``(..., H, W)`` uint8 images, rounded back to uint8.

    The default taps are OpenCV's ``GaussianBlur(ksize=(9, 9), sigmaX=0)``. Borders reflect without
    repeating the edge pixel (numpy's "reflect" is OpenCV's default BORDER_REFLECT_101). OpenCV blurs
    uint8 in fixed point, so a few pixels can differ by 1 from ``cv2.GaussianBlur``; the difference
    signal only counts pixels, so that is immaterial. Taps too narrow to change any value
    (:func:`_blur_is_identity`) return ``gray`` itself without computing anything. Leading axes are
    a batch: each image is blurred on its own, with the same arithmetic as alone.
    """
    if _blur_is_identity(taps):
        return gray
    return _separable_blur(gray, taps)


def _separable_blur(gray: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """The arithmetic of :func:`_gaussian_blur`, always computed: float32 rows then columns, rounded.

    Each pass sums ``tap * shifted image`` in tap order in float32 (the first product needs no sum).
    """
    half = taps.size // 2
    height, width = gray.shape[-2:]
    # "reflect" needs the axis to be longer than the padding; tiny images fall back to edge repeats.
    mode: Literal["reflect", "edge"] = "reflect" if min(height, width) > half else "edge"
    pad_width = [(0, 0)] * (gray.ndim - 2) + [(half, half), (half, half)]
    padded = np.pad(gray.astype(np.float32), pad_width, mode=mode)  # (..., H + 2 half, W + 2 half)
    rows = np.multiply(padded[..., 0:width], taps[0])  # (..., H + 2 half, W)
    product = np.empty_like(rows)
    for tap in range(1, taps.size):
        np.multiply(padded[..., tap : tap + width], taps[tap], out=product)
        rows += product
    out = np.multiply(rows[..., 0:height, :], taps[0])  # (..., H, W)
    product = product[..., 0:height, :]
    for tap in range(1, taps.size):
        np.multiply(rows[..., tap : tap + height, :], taps[tap], out=product)
        out += product
    np.rint(out, out=out)
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


def _blur_is_identity(taps: np.ndarray) -> bool:
    """Whether :func:`_gaussian_blur` with ``taps`` returns every uint8 image unchanged.

    Each of the two passes moves a value by at most ``255 * (|1 - centre| + sum |other taps|)`` in exact
    arithmetic, and float32 rounding adds far less than 0.01 over 9 taps; if twice that bound stays under
    0.25, ``rint`` gives back every input value. This holds for the blur scaled to a 64 px analysis of
    any video of 480p or more (sigma <= 0.23 analysis pixels: the side taps are below 1e-4), where
    skipping it saves most of the per-frame numpy work of the analysis pass.
    """
    centre = taps.size // 2
    deviation = abs(1.0 - float(taps[centre])) + float(np.abs(taps).sum() - abs(taps[centre]))
    return 2 * 255 * deviation < 0.25


def _brightened_pixels(blurred: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Pixels where ``cv2.subtract(blurred, previous)`` is non-zero, i.e. ``blurred > previous``.

    ``(..., H, W)`` uint8 both -> int64 ``(...)`` counts.
    """
    return np.count_nonzero(blurred > previous, axis=(-2, -1))


def _batch_length(height: int, width: int) -> int:
    """Frames analysed together by :func:`_signal_values`: up to ``_ANALYSIS_BATCH``, within
    ``_ANALYSIS_BATCH_BYTES`` of RGB (the float32 temporaries are 4x that per image)."""
    return max(1, min(_ANALYSIS_BATCH, _ANALYSIS_BATCH_BYTES // (height * width * 3)))


def _signal_values(rgb: np.ndarray, taps: np.ndarray, previous: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Difference-signal values of consecutive frames, computed a batch of frames at a time.

    Args:
        rgb: uint8 ``(T, H, W, 3)``, T >= 1, the frames in order.
        taps: blur taps (:func:`_blur_taps`).
        previous: uint8 ``(H, W)`` blurred frame just before ``rgb[0]``, or None when ``rgb[0]`` is the
            video's first frame (compared with itself, as the authors do: value 0).

    Returns:
        ``(values, last)``: float64 ``(T,)`` counts and the blurred last frame ``(H, W)`` (a copy),
        to pass as ``previous`` with the next frames.
    """
    values = np.empty(rgb.shape[0], dtype=np.float64)
    step = _batch_length(rgb.shape[1], rgb.shape[2])
    for start in range(0, rgb.shape[0], step):
        blurred = _gaussian_blur(_to_gray(rgb[start : start + step]), taps)  # (B, H, W)
        before = blurred[0] if previous is None else previous
        values[start] = _brightened_pixels(blurred[0], before)
        values[start + 1 : start + blurred.shape[0]] = _brightened_pixels(blurred[1:], blurred[:-1])
        previous = blurred[-1].copy()  # the batch's arrays are reused or freed
    assert previous is not None
    return values, previous


def _analysis_size(height: int, width: int, short_side: int | None) -> tuple[int, int]:
    """Stored-frame (H, W) for the analysis pass: short side ``short_side``, never upscaled."""
    if short_side is None or min(height, width) <= short_side:
        return height, width
    if height <= width:
        return short_side, max(1, math.floor(width * short_side / height + 0.5))
    return max(1, math.floor(height * short_side / width + 0.5)), short_side


def _analyse_frames(
    frames: queue.Queue[av.VideoFrame | None],
    analysis_size: int | None,
    values: list[float],
    failure: list[BaseException],
) -> None:
    """Worker of :func:`_signal_of_file`: difference-signal values of the frames put on ``frames``.

    Resizes each frame to the analysis size in libswscale as it arrives and analyses them in batches
    (:func:`_signal_values`): at 64 px, numpy's per-call overhead, not arithmetic, was most of the
    per-frame cost. Every frame is resized to the first frame's analysis size. Consumes until the
    ``None`` sentinel even after an error (kept in ``failure``), so the decoding thread never blocks on
    a full queue.
    """
    # One swscale context for all frames: a new one per frame costs more than decoding at this size.
    reformatter = VideoReformatter()
    batch: np.ndarray | None = None  # (B, h, w, 3) frames waiting for analysis
    filled = 0
    previous: np.ndarray | None = None
    taps = _BLUR_TAPS
    height = width = 0
    while (frame := frames.get()) is not None:
        if failure:
            continue
        try:
            if batch is None:
                height, width = _analysis_size(frame.height, frame.width, analysis_size)
                taps = _blur_taps(min(height, width) / min(frame.height, frame.width))
                batch = np.empty((_batch_length(height, width), height, width, 3), dtype=np.uint8)
            batch[filled] = reformatter.reformat(frame, format="rgb24", width=width, height=height).to_ndarray()
            filled += 1
            if filled == batch.shape[0]:
                counts, previous = _signal_values(batch, taps, previous)
                values.extend(counts.tolist())
                filled = 0
        except BaseException as err:  # handed to the decoding thread, which raises it
            failure.append(err)
    if filled and batch is not None and not failure:
        try:
            values.extend(_signal_values(batch[:filled], taps, previous)[0].tolist())
        except BaseException as err:
            failure.append(err)


def _signal_of_file(path: Path, analysis_size: int | None) -> tuple[np.ndarray, float | None]:
    """:func:`difference_signal` for a video file, decoding with PyAV one frame at a time.

    The decoder (with its frame threads) runs on the calling thread and hands each frame to one worker
    thread for the resize, gray and blur, through a queue of at most ``_PIPELINE_DEPTH`` frames (memory
    stays flat in the video's length), so the resize can use a core the decoder leaves idle instead of
    delaying the next packet; both threads spend most of their time in FFmpeg without the GIL. On the
    1080p/4K camera clips of benchmarks/keyframes.py --camera (2 shared cores) the threaded pass was as
    fast as or faster than the same work inline (1.23 vs 1.26x, 1.11 vs 1.14x, 1.35 vs 1.46x a bare
    decode, interleaved medians of 7); the resize itself is most of what remains above the decode.

    The display rotation is not applied: a rotation by a multiple of 90 degrees permutes the pixels and
    the blur kernel is the same along both axes, so the count of brightened pixels does not change.
    """
    container, stream = open_video(path)
    values: list[float] = []
    failure: list[BaseException] = []
    frames: queue.Queue[av.VideoFrame | None] = queue.Queue(maxsize=_PIPELINE_DEPTH)
    worker = threading.Thread(target=_analyse_frames, args=(frames, analysis_size, values, failure), daemon=True)
    num_decoded = 0
    try:
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        worker.start()
        for frame in container.decode(stream):
            if failure:
                break
            frames.put(frame)
            num_decoded += 1
    except (av.FFmpegError, OSError) as err:
        raise VideoDecodeError(f"{path}: corrupt video, decoding failed after {num_decoded} frames: {err}") from err
    finally:
        if worker.is_alive():
            frames.put(None)
            worker.join()
        container.close()
    if failure:
        raise failure[0]
    if not values:
        raise VideoDecodeError(f"{path}: video stream has no decodable frames")
    return np.asarray(values, dtype=np.float64), fps


def _signal_of_folder(path: Path, analysis_size: int | None) -> np.ndarray:
    """:func:`difference_signal` for a folder of frame images, decoded a few at a time."""
    info = probe_video(path)
    # Downscale like a video file's analysis pass, but never upscale small images.
    short_side = analysis_size if analysis_size is not None and min(info.height, info.width) > analysis_size else None
    taps = _blur_taps(1.0 if short_side is None else short_side / min(info.height, info.width))
    values = np.zeros(info.num_frames, dtype=np.float64)
    previous: np.ndarray | None = None
    for start in range(0, info.num_frames, _FOLDER_CHUNK):
        chunk = range(start, min(start + _FOLDER_CHUNK, info.num_frames))
        frames = decode_frames(path, indices=chunk, short_side=short_side)  # (T, H, W, 3)
        values[chunk.start : chunk.stop], previous = _signal_values(frames.numpy(), taps, previous)
    return values


def difference_signal(path: str | os.PathLike[str], analysis_size: int | None = 64) -> tuple[np.ndarray, float | None]:
    """Per-frame count of pixels that got brighter after grayscale + 9x9 Gaussian blur, streaming.

    Args:
        path: video file or folder of frame images.
        analysis_size: short side in pixels at which frames are analysed (aspect ratio kept, never
            upscaled); None analyses at full resolution as the authors did. The blur is scaled with
            the frames (:func:`_blur_taps`), so the downscale mostly changes the unit of the counts
            (pixels at 64 px instead of source pixels), which :func:`find_peaks` only compares to
            their own range. At 64 px the whole keyframe grid of a 640x360 video took 0.14-0.18x
            the time of the full-size analysis in benchmarks/keyframes.py and chose the same
            keyframes, finding the same cuts (17 of 21; the missed ones are cuts to darker scenes,
            where the authors' count of brightened pixels stays small at any resolution).

    Returns:
        ``(signal, fps)``: float64 ``(num_frames,)`` counts (``signal[0] == 0``) and the average frame
        rate (None for a frame folder or when unknown).

    Raises:
        VideoDecodeError: missing path, no video stream, corrupt file, no frames. Names the file.
        ValueError: ``analysis_size < 1``.
    """
    path = Path(path)
    if analysis_size is not None and analysis_size < 1:
        raise ValueError(f"{path}: analysis_size must be positive, got {analysis_size}")
    if path.is_dir():
        return _signal_of_folder(path, analysis_size), None
    return _signal_of_file(path, analysis_size)


def _check_threshold(threshold: float) -> None:
    if not (math.isfinite(threshold) and 0.0 <= threshold < 1.0):
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")


def _polynomial_baseline(signal: np.ndarray) -> np.ndarray:
    """Degree-2 baseline under the signal, as ``peakutils.baseline(signal, 2)`` computes it.

    A least-squares polynomial fit over the frame index is repeated with the signal clipped to the
    previous fit (``min(signal, fit)``), so the peaks stop pulling the fit up and it settles under
    them; a single fit would sit above the quiet parts of a spiky signal. Stops when the coefficients
    change by less than 1e-3 relative, or after 100 fits. The index axis is scaled to
    ``[0, max|signal|^(1/3)]`` as in peakutils, which keeps the normal equations well conditioned and
    makes that tolerance mean the same as there.

    Args:
        signal: float64 ``(N,)``.

    Returns:
        float64 ``(N,)`` baseline.
    """
    order = _BASELINE_DEGREE + 1
    scale = float(np.abs(signal).max()) ** (1.0 / order)
    x = np.linspace(0.0, scale, signal.size)
    vander = np.vander(x, order)  # (N, 3)
    vander_pinv = np.linalg.pinv(vander)  # (3, N)
    clipped = signal.copy()
    coeffs = np.ones(order)
    base = signal.copy()
    for _ in range(_BASELINE_MAX_ITER):
        new_coeffs = vander_pinv @ clipped
        if np.linalg.norm(new_coeffs - coeffs) / max(float(np.linalg.norm(coeffs)), 1e-300) < _BASELINE_TOL:
            break
        coeffs = new_coeffs
        base = vander @ coeffs
        clipped = np.minimum(clipped, base)
    return base


def _local_maxima(values: np.ndarray) -> np.ndarray:
    """Indices of strict local maxima of ``values`` ``(N,)``; a flat top counts once, at its middle.

    A plateau ``values[a..b]`` higher than both ``values[a-1]`` and ``values[b+1]`` yields
    ``a + (b - a) // 2`` (the left middle, as peakutils picks it). The first and last samples are never
    maxima: nothing is known about their outer neighbour.
    """
    if values.size < 3:
        return np.zeros(0, dtype=np.int64)
    # Runs of equal values: run r covers [starts[r], ends[r]].
    change = np.flatnonzero(values[1:] != values[:-1]) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change - 1, [values.size - 1]))
    run_values = values[starts]
    inner = np.arange(1, starts.size - 1)
    is_max = (run_values[inner] > run_values[inner - 1]) & (run_values[inner] > run_values[inner + 1])
    top = inner[is_max]
    return starts[top] + (ends[top] - starts[top]) // 2


def find_peaks(signal: np.ndarray, threshold: float = 0.1) -> list[int]:
    """Peaks of a difference signal after removing its degree-2 polynomial baseline.

    With ``d = signal - baseline`` (see :func:`_polynomial_baseline`), a peak is a strict local maximum
    of ``d`` (a flat top counts once, at its middle) with ``d > min(d) + threshold * (max(d) - min(d))``,
    the relative threshold of ``peakutils.indexes`` that the authors use. Pure function.

    Args:
        signal: ``(N,)`` values, e.g. from :func:`difference_signal`.
        threshold: fraction of the range of ``d`` in [0, 1); the demo uses 0.1.

    Returns:
        Sorted peak indices; empty for a constant signal or fewer than 3 samples.

    Raises:
        ValueError: threshold outside [0, 1), or ``signal`` not 1-D / not finite.
    """
    _check_threshold(threshold)
    values = np.asarray(signal, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"signal must be 1-D, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("signal must be finite")
    if values.size < 3 or values.max() == values.min():
        return []
    detrended = values - _polynomial_baseline(values)
    low, high = float(detrended.min()), float(detrended.max())
    if high <= low:
        return []
    level = low + threshold * (high - low)
    maxima = _local_maxima(detrended)
    return [int(i) for i in maxima[detrended[maxima] > level]]


def choose_keyframes(peaks: list[int], num_frames: int, num: int = 12) -> list[int]:
    """``num`` frame indices spread evenly over the peaks, in temporal order.

    * ``len(peaks) >= num``: the peaks at the centres of ``num`` equal segments of the sorted peak list
      (:func:`mama.data.sampling.uniform_indices`), all distinct. (The authors took
      ``np.linspace(1, P - 1, num).astype(int)`` into a set, which skips the first peak and collapses
      to fewer frames when ``P`` is small.)
    * ``len(peaks) < num <= num_frames``: every peak, plus ``num - len(peaks)`` frames that are not
      peaks, spread uniformly over the non-peak frames; exactly ``num`` distinct indices.
    * ``num_frames < num``: every frame, some repeated, spread uniformly (``num`` non-decreasing
      indices), so the grid is still full; peaks play no role.

    Args:
        peaks: peak frame indices in ``[0, num_frames)`` (any order; duplicates ignored).
        num_frames: length of the video, >= 1.
        num: number of keyframes, >= 1.

    Returns:
        ``num`` sorted frame indices.

    Raises:
        ValueError: ``num < 1``, ``num_frames < 1``, or a peak outside ``[0, num_frames)``.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    unique = sorted({int(p) for p in peaks})
    if unique and (unique[0] < 0 or unique[-1] >= num_frames):
        raise ValueError(f"peaks must lie in [0, {num_frames}), got {unique[0]}..{unique[-1]}")
    if num_frames < num:
        return [int(i) for i in uniform_indices_array(num_frames, num)]
    if len(unique) >= num:
        return [unique[int(i)] for i in uniform_indices_array(len(unique), num)]
    # int64 per frame, like the difference signal itself: this does not change how memory scales.
    non_peaks = np.setdiff1d(np.arange(num_frames), np.asarray(unique, dtype=np.int64), assume_unique=True)
    fill = non_peaks[uniform_indices_array(non_peaks.size, num - len(unique))]
    return sorted(unique + [int(i) for i in fill])


def extract_keyframes(
    path: str | os.PathLike[str],
    num: int = 12,
    threshold: float = 0.1,
    analysis_size: int | None = 64,
) -> Keyframes:
    """Difference signal, peaks and ``num`` keyframes of a video (one streaming decode, no frames kept).

    Args:
        path: video file or folder of frame images.
        num: number of keyframes, >= 1.
        threshold: peak threshold in [0, 1), see :func:`find_peaks`.
        analysis_size: short side for the analysis pass, see :func:`difference_signal`.

    Raises:
        VideoDecodeError: unreadable video (names the file).
        ValueError: ``num < 1`` or a bad threshold (checked before decoding).
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    _check_threshold(threshold)
    signal, fps = difference_signal(path, analysis_size=analysis_size)
    peaks = find_peaks(signal, threshold)
    keyframes = choose_keyframes(peaks, signal.size, num)
    return Keyframes(Path(path), int(signal.size), fps, peaks, keyframes)


def tile_grid(frames: Tensor | np.ndarray, rows: int = 3, cols: int = 4) -> Tensor:
    """Tile frames row-major (left to right, then top to bottom) into one image.

    Args:
        frames: uint8 ``(N, H, W, 3)`` with ``N <= rows * cols``.
        rows, cols: grid shape, >= 1.

    Returns:
        uint8 ``(rows * H, cols * W, 3)``; frame ``i`` fills cell ``(i // cols, i % cols)``, cells past
        ``N`` are black.

    Raises:
        ValueError: bad shape or dtype, ``rows`` / ``cols`` < 1, or more frames than cells.
    """
    import torch

    frames = torch.as_tensor(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape (N, H, W, 3), got {tuple(frames.shape)}")
    if frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if rows < 1 or cols < 1:
        raise ValueError(f"rows and cols must be >= 1, got {rows} x {cols}")
    num, height, width, _ = frames.shape
    if num > rows * cols:
        raise ValueError(f"{num} frames do not fit a {rows} x {cols} grid")
    cells = torch.zeros((rows * cols, height, width, 3), dtype=torch.uint8)
    cells[:num] = frames
    grid = cells.reshape(rows, cols, height, width, 3).permute(0, 2, 1, 3, 4)  # (rows, H, cols, W, 3)
    return grid.reshape(rows * height, cols * width, 3)


def keyframe_grid(
    path: str | os.PathLike[str],
    num: int = 12,
    threshold: float = 0.1,
    rows: int = 3,
    cols: int = 4,
    tile_short_side: int | None = 224,
    analysis_size: int | None = 64,
) -> tuple[Keyframes, Tensor]:
    """Keyframes of a video and their grid image (the LVLM captioner's input).

    The analysis pass streams (see :func:`extract_keyframes`); then only the keyframes are decoded, at
    display orientation and size (short side ``tile_short_side``; None keeps the full size), by
    :func:`mama.data.video.decode_frames`, which seeks instead of decoding everything before them.

    Returns:
        ``(keyframes, grid)`` with grid uint8 ``(rows * h, cols * w, 3)``, ``h, w`` the tile size.

    Raises:
        VideoDecodeError: unreadable video (names the file).
        ValueError: ``num < 1``, ``rows * cols < num``, a bad threshold or tile size (checked before
            decoding).
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if rows < 1 or cols < 1 or rows * cols < num:
        raise ValueError(f"a {rows} x {cols} grid cannot hold {num} keyframes")
    if tile_short_side is not None and tile_short_side < 1:
        raise ValueError(f"tile_short_side must be positive, got {tile_short_side}")
    _check_threshold(threshold)
    keyframes = extract_keyframes(path, num=num, threshold=threshold, analysis_size=analysis_size)
    frames = decode_frames(path, indices=keyframes.keyframes, short_side=tile_short_side)  # (num, h, w, 3)
    return keyframes, tile_grid(frames, rows, cols)


def save_image(path: str | os.PathLike[str], rgb: Tensor | np.ndarray) -> Path:
    """Write an RGB image as JPEG (``.jpg`` / ``.jpeg``) or PNG (``.png``) atomically, with PyAV.

    JPEG uses the MJPEG encoder at quantiser scale 2 in full-range 4:4:4 (``yuvj444p``): no chroma
    subsampling, so odd sizes need no padding and tile borders keep their colours; PNG is lossless
    ``rgb24``. The file is written under a temporary name in the same folder and renamed into place.

    Args:
        path: output file; its suffix picks the format.
        rgb: uint8 ``(H, W, 3)``.

    Returns:
        ``path`` as a Path.

    Raises:
        ValueError: unknown suffix, or ``rgb`` not uint8 ``(H, W, 3)`` with ``H, W >= 1``.
    """
    path = Path(path)
    image = np.asarray(rgb)  # a CPU tensor converts without a copy; no torch import needed here
    if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{path}: image must have shape (H, W, 3), got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"{path}: image must be uint8, got {image.dtype}")
    suffix = path.suffix.lower()
    codec: Literal["mjpeg", "png"]  # literal names make av type the context as a VideoCodecContext
    if suffix in (".jpg", ".jpeg"):
        codec, pix_fmt = "mjpeg", "yuvj444p"
    elif suffix == ".png":
        codec, pix_fmt = "png", "rgb24"
    else:
        raise ValueError(f"{path}: unsupported image suffix {path.suffix!r} (use .jpg, .jpeg or .png)")

    height, width, _ = image.shape
    context = av.CodecContext.create(codec, "w")
    context.width = width
    context.height = height
    context.pix_fmt = pix_fmt
    context.time_base = Fraction(1, 1)
    if codec == "mjpeg":
        context.qscale = True  # fixed quantiser instead of bit-rate control
        context.global_quality = _JPEG_QSCALE * _FF_QP2LAMBDA
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
    if pix_fmt != "rgb24":
        frame = frame.reformat(format=pix_fmt)
    # Both encoders emit one packet that is a complete image file; no muxer is needed.
    data = b"".join(bytes(packet) for packet in [*context.encode(frame), *context.encode(None)])

    tmp_path = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.tmp{path.suffix}")
    try:
        tmp_path.write_bytes(data)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path
