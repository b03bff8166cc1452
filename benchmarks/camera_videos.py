"""Camera-like test clips for the decode and keyframe benchmarks: 1080p and 4K, H.264 and HEVC.

Generated footage (no real clip ships with the repository) with what makes camera files slow and
the keyframe signal noisy: a fine multi-scale texture larger than the frame that the camera pans
across, per-frame sensor noise, and hard cuts to darker and brighter scenes. Encoded with B-frames
and one long GOP per clip (a keyframe every 250 frames and no extra keyframes at cuts, so a 4-s
clip is a single GOP, like the phone clips the keyframe issue was measured on): H.264 (libx264, ``veryfast``, 3 B-frames) or
HEVC (libx265, ``ultrafast``, 3 B-frames).

    python benchmarks/camera_videos.py OUT_DIR [--seconds 4] [--sizes 1080p,4k] [--codecs h264,hevc]

writes the clips and prints their frame counts, cut frames and encode times; the benchmarks import
:func:`make_camera_clip`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.stream import VideoStream

SIZES = {"720p": (720, 1280), "1080p": (1080, 1920), "4k": (2160, 3840)}  # (height, width)
CODECS = {
    # x264 veryfast keeps 3 B-frames (ultrafast has none); x265 ultrafast has 3 already.
    "h264": ("libx264", {"preset": "veryfast", "crf": "23", "bf": "3", "g": "250", "sc_threshold": "0"}),
    "hevc": (
        "libx265",
        {"preset": "ultrafast", "crf": "28", "x265-params": "bframes=3:keyint=250:scenecut=0:log-level=error"},
    ),
}
_NOISE_FIELDS = 6  # distinct sensor-noise fields cycled over the frames (generating one per frame at 4K is slow)


@dataclass(frozen=True)
class CameraClip:
    path: Path
    num_frames: int
    height: int
    width: int
    codec: str
    cuts: list[int]  # first frame of each new scene
    darker_cuts: list[int]  # the cuts whose new scene is darker than the previous one


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 ``(H, W, 3)``: coarse colour blobs + mid-scale structure + fine grain, like foliage or
    fabric filmed in focus (block-upsampled noise at three scales)."""
    out = np.zeros((height, width, 3), dtype=np.float32)
    for cell, amplitude in ((max(height, width) // 12, 60.0), (24, 30.0), (3, 18.0)):
        coarse = rng.normal(0.0, amplitude, (height // cell + 2, width // cell + 2, 3)).astype(np.float32)
        out += np.repeat(np.repeat(coarse, cell, axis=0), cell, axis=1)[:height, :width]
    out += rng.uniform(70, 170, size=3).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def make_camera_clip(
    path: Path,
    height: int,
    width: int,
    codec: str = "h264",
    seconds: float = 4.0,
    fps: int = 30,
    seed: int = 0,
    scene_seconds: tuple[float, float] = (0.8, 1.6),
) -> CameraClip:
    """Encode one clip frame by frame (memory: one texture, never the frame list) and describe it.

    Each scene pans a window over its own texture (1.5x the frame) by 4-12 px per frame in a random
    direction, adds Gaussian sensor noise (std 3 levels), and scales its brightness by a factor in
    0.45-1.4, so that consecutive scenes are darker or brighter; scene lengths are drawn from
    ``scene_seconds``.
    """
    encoder, options = CODECS[codec]
    rng = np.random.default_rng(seed)
    num_frames = round(seconds * fps)
    noise = rng.normal(0.0, 3.0, (_NOISE_FIELDS, height, width, 1)).astype(np.float32)
    cuts: list[int] = []
    darker: list[int] = []
    previous_gain: float | None = None
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(encoder, rate=fps)
        assert isinstance(stream, VideoStream)  # the encoder name is not a literal av can type by
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = dict(options)
        index = 0
        while index < num_frames:
            if index:
                cuts.append(index)
            texture = _texture(rng, int(height * 1.5), int(width * 1.5))
            gain = float(rng.uniform(0.45, 1.4))
            if previous_gain is not None and gain < previous_gain:
                darker.append(index)
            previous_gain = gain
            velocity = rng.uniform(4, 12) * np.array([np.sin(angle := rng.uniform(0, 2 * np.pi)), np.cos(angle)])
            start = np.array([rng.integers(0, height // 4), rng.integers(0, width // 4)], dtype=np.float64)
            length = min(int(rng.uniform(*scene_seconds) * fps), num_frames - index)
            for step in range(length):
                y, x = (start + velocity * step).astype(int) % [height // 2, width // 2]
                rgb = texture[y : y + height, x : x + width].astype(np.float32) * gain
                rgb += noise[index % _NOISE_FIELDS]
                frame = av.VideoFrame.from_ndarray(np.clip(rgb, 0, 255).astype(np.uint8), format="rgb24")
                frame.pts, frame.time_base = index, Fraction(1, fps)
                for packet in stream.encode(frame):
                    container.mux(packet)
                index += 1
        for packet in stream.encode(None):
            container.mux(packet)
    return CameraClip(path, num_frames, height, width, codec, cuts, darker)


def _load_described(path: Path, recipe: dict[str, object]) -> CameraClip | None:
    """The clip at ``path`` if its sidecar JSON says it was made by ``recipe``, else None."""
    sidecar = path.with_suffix(".json")
    if not (path.is_file() and sidecar.is_file()):
        return None
    try:
        saved = json.loads(sidecar.read_text())
    except json.JSONDecodeError:
        return None
    if saved.get("recipe") != recipe:
        return None
    clip = saved["clip"]
    return CameraClip(
        path, clip["num_frames"], clip["height"], clip["width"], clip["codec"], clip["cuts"], clip["darker_cuts"]
    )


def make_camera_set(
    out_dir: Path, sizes: list[str], codecs: list[str], seconds: float, seed: int = 0
) -> list[CameraClip]:
    """One clip per (size, codec) into ``out_dir``, named ``camera_{size}_{codec}.mp4``.

    Each clip gets a sidecar ``.json`` with its recipe (size, codec, encoder options, length, seed) and
    cut frames; a later call with the same recipe reuses the file instead of encoding it again (a 4K
    HEVC clip takes minutes to encode on 2 cores). The video is written under a temporary name and
    renamed, and the sidecar after it, so an interrupted run never leaves a clip that looks finished.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    clips = []
    for size in sizes:
        height, width = SIZES[size]
        for codec in codecs:
            path = out_dir / f"camera_{size}_{codec}.mp4"
            recipe = {"size": size, "codec": codec, "options": CODECS[codec][1], "seconds": seconds, "seed": seed}
            clip = _load_described(path, recipe)
            if clip is None:
                path.with_suffix(".json").unlink(missing_ok=True)
                tmp = path.with_name(f".{path.stem}.tmp.mp4")
                made = make_camera_clip(tmp, height, width, codec, seconds, seed=seed)
                os.replace(tmp, path)
                clip = dataclasses.replace(made, path=path)
                described = {k: v for k, v in dataclasses.asdict(clip).items() if k != "path"}
                path.with_suffix(".json").write_text(json.dumps({"recipe": recipe, "clip": described}))
            clips.append(clip)
    return clips


@contextmanager
def camera_clips(keep: Path | None, sizes: str, codecs: str, seconds: float) -> Iterator[list[CameraClip]]:
    """The benchmarks' clips (:func:`make_camera_set` of comma-separated ``sizes`` and ``codecs``) in
    ``keep``, where they stay for the next run, or in a temporary folder removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = keep or Path(tmp)
        start = time.perf_counter()
        clips = make_camera_set(out_dir, sizes.split(","), codecs.split(","), seconds)
        print(f"{len(clips)} camera-like clips ready in {time.perf_counter() - start:.0f} s in {out_dir}")
        yield clips


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--sizes", default="1080p,4k", help=f"comma-separated of {sorted(SIZES)}")
    parser.add_argument("--codecs", default="h264,hevc", help=f"comma-separated of {sorted(CODECS)}")
    args = parser.parse_args(argv)
    for size in args.sizes.split(","):
        for codec in args.codecs.split(","):
            start = time.perf_counter()
            (clip,) = make_camera_set(args.out, [size], [codec], args.seconds)
            print(
                f"{clip.path.name}: {clip.num_frames} frames {clip.width}x{clip.height} {clip.codec},"
                f" cuts {clip.cuts} (darker {clip.darker_cuts}), {clip.path.stat().st_size / 1e6:.1f} MB,"
                f" encoded in {time.perf_counter() - start:.1f} s"
            )


if __name__ == "__main__":
    main()
