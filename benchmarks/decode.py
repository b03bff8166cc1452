"""Cost of delivering a 12-frame clip from real-size videos: our decoder against a plain full decode.

Generates H.264 test videos (640x360, 30 fps, GOP 250 like a camera or a web upload) into a temporary
folder, then times on the same files, interleaved per video:

1. ours: ``decode_frames(path, indices=uniform_indices(n, 12), short_side=224)``: seeks to the keyframe
   before each wanted frame and resizes in libswscale during RGB conversion;
2. ours at full size: the same without ``short_side`` (separates the seek gain from the resize gain);
3. full decode: plain PyAV, every frame decoded and converted to RGB at full size
   (``frame.to_ndarray(format="rgb24")``, the usual idiom), then the 12 picked;
4. full decode with one shared ``VideoReformatter`` (the idiom above builds a swscale context per
   frame; this row shows how much of the baseline's cost that is);
5. decord ``get_batch`` of the same indices with width/height resize, if decord is installed.

    python benchmarks/decode.py [--quick] [--videos 6] [--repeats 2] [--keep DIR]

Prints frames delivered per second (12 x videos / s), wall time per video and the ratio to the full
decode.

With ``--camera`` it measures instead the camera-like clips of ``benchmarks/camera_videos.py`` (1080p
and 4K, H.264 and HEVC with B-frames, one GOP; ``--camera-seconds`` long; with ``--keep DIR`` kept
and reused), side by side and interleaved over ``--repeats`` rounds (medians of wall and CPU time):
our sparse decode of 8 and 12 frames (``decode_frames(path, indices=uniform_indices(n, k),
short_side=224)``), decord's ``VideoReader(path, width=w, height=h).get_batch(indices)`` at the same
output size (reader construction included, as ours includes opening the file), and a full PyAV decode
of every frame (frame threads, no conversion: the floor of any sequential decode). Needs decord
(``pip install -e ".[bench]"``); without it the decord rows are skipped.

    python benchmarks/decode.py --camera [--camera-sizes 1080p,4k] [--camera-codecs h264,hevc]
                                [--camera-seconds 4] [--repeats 5] [--keep DIR]

Run it alone: a second busy process on 2 cores distorts the timings.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from mama.data.sampling import uniform_indices
from mama.data.video import count_frames, decode_frames

NUM_FRAMES = 12
SHORT_SIDE = 224


def make_video(path: Path, seconds: float, seed: int, height: int = 360, width: int = 640, fps: int = 30) -> Path:
    """Encode a moving textured scene (panning sinusoids plus a bouncing box) as H.264 with GOP 250."""
    rng = np.random.default_rng(seed)
    # A texture wider than the frame, panned horizontally: cheap to generate, realistic motion for x264.
    ys, xs = np.mgrid[0:height, 0 : width * 2]
    fx, fy = rng.uniform(0.01, 0.05, size=2)
    texture = np.stack(
        [127 + 100 * np.sin(fx * xs + c) * np.cos(fy * ys + 2 * c) for c in (0.0, 1.0, 2.0)], axis=-1
    ).astype(np.uint8)  # (H, 2W, 3)
    num_frames = int(seconds * fps)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "g": "250"}
        for t in range(num_frames):
            offset = (3 * t) % width
            rgb = np.ascontiguousarray(texture[:, offset : offset + width])
            box_y, box_x = (5 * t) % (height - 60), (7 * t) % (width - 80)
            rgb[box_y : box_y + 60, box_x : box_x + 80] = (240, 40, 40)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = t
            frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def full_decode(path: Path, indices: list[int]) -> torch.Tensor:
    """The naive baseline: decode and convert every frame at full size, keep the wanted ones."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    return torch.from_numpy(np.stack([frames[i] for i in indices]))


def full_decode_shared_reformatter(path: Path, indices: list[int]) -> torch.Tensor:
    """The baseline with the RGB conversion done by one reused swscale context."""
    reformatter = VideoReformatter()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = [reformatter.reformat(frame, format="rgb24").to_ndarray() for frame in container.decode(stream)]
    return torch.from_numpy(np.stack([frames[i] for i in indices]))


def decord_reader() -> Callable[[Path, list[int]], torch.Tensor] | None:
    """decord's batch reader resizing to the same short side, or None if decord is not installed."""
    try:
        import decord
    except ImportError:
        return None

    def read(path: Path, indices: list[int]) -> torch.Tensor:
        probe = decord.VideoReader(str(path))
        height, width, _ = probe[0].shape
        scale = SHORT_SIDE / min(height, width)
        reader = decord.VideoReader(str(path), width=round(width * scale), height=round(height * scale))
        return torch.from_numpy(reader.get_batch(indices).asnumpy())

    return read


def _decord_batch(path: Path, indices: list[int], size: tuple[int, int]) -> torch.Tensor:
    import decord

    reader = decord.VideoReader(str(path), width=size[1], height=size[0])
    return torch.from_numpy(reader.get_batch(indices).asnumpy())


def _full_decode_floor(path: Path) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return sum(1 for _ in container.decode(stream))


def camera_benchmark(args: argparse.Namespace) -> None:
    """The ``--camera`` mode (module doc)."""
    import statistics
    from functools import partial

    from camera_videos import camera_clips  # next to this script
    from mama.data.video import probe_video

    try:
        import decord  # noqa: F401

        with_decord = True
    except ImportError:
        with_decord = False
        print("decord is not installed: skipping the decord rows (pip install -e '.[bench]')")

    with camera_clips(args.keep, args.camera_sizes, args.camera_codecs, args.camera_seconds) as clips:
        print(
            f"medians of {args.repeats} interleaved rounds (wall s, CPU s = user + sys of all threads); "
            f"frames at short side {SHORT_SIDE}; ratios of wall time against the full decode"
        )
        summary: list[str] = []
        for clip in clips:
            info = probe_video(clip.path)
            out_h, out_w = decode_frames(clip.path, indices=[0], short_side=SHORT_SIDE).shape[1:3]
            methods: dict[str, Callable[[], object]] = {}
            for k in (8, 12):
                indices = uniform_indices(info.num_frames, k).tolist()
                methods[f"ours, {k} frames"] = partial(decode_frames, clip.path, indices=indices, short_side=SHORT_SIDE)
                if with_decord:
                    methods[f"decord, {k} frames"] = partial(_decord_batch, clip.path, indices, (out_h, out_w))
            methods["full decode (PyAV)"] = partial(_full_decode_floor, clip.path)
            wall: dict[str, list[float]] = {name: [] for name in methods}
            cpu: dict[str, list[float]] = {name: [] for name in methods}
            for _ in range(args.repeats):
                for name, method in methods.items():
                    t0, c0 = time.perf_counter(), time.process_time()
                    method()
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
            # Same frames as a full decode converted the same way: the sparse path must not change pixels.
            indices = uniform_indices(info.num_frames, 12).tolist()
            ours = decode_frames(clip.path, indices=indices, short_side=SHORT_SIDE)
            reference = decode_frames(clip.path, short_side=SHORT_SIDE)[indices]
            identical = torch.equal(ours, reference)
            med = {name: statistics.median(values) for name, values in wall.items()}
            floor = med["full decode (PyAV)"]
            print(f"\n{clip.width}x{clip.height} {clip.codec} {info.num_frames} frames -> {out_w}x{out_h}")
            for name, seconds in med.items():
                print(
                    f"  {name:<20} {seconds:7.3f} s  {seconds / floor:5.2f}x   CPU {statistics.median(cpu[name]):6.2f} s"
                )
            print(f"  ours (12 frames) identical to the full decode's frames: {'yes' if identical else 'NO'}")
            if with_decord:
                ratios = ", ".join(
                    f"{k}: {med[f'decord, {k} frames'] / med[f'ours, {k} frames']:.2f}x" for k in (8, 12)
                )
                summary.append(f"{clip.width}x{clip.height} {clip.codec}: decord / ours {ratios}")
        if summary:
            print("\nsummary (decord time / our time; goal >= 1.00 everywhere):")
            for line in summary:
                print(f"  {line}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 videos of 8-16 s (about a minute in all)")
    parser.add_argument("--videos", type=int, default=6, help="number of test videos (20-60 s each)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs per method and video; the fastest counts (default 2); --camera: rounds, medians (default 5)",
    )
    parser.add_argument("--keep", type=Path, default=None, help="write the videos here and keep them")
    parser.add_argument("--camera", action="store_true", help="camera-like 1080p/4K clips against decord")
    parser.add_argument("--camera-sizes", default="1080p,4k")
    parser.add_argument("--camera-codecs", default="h264,hevc")
    parser.add_argument("--camera-seconds", type=float, default=4.0)
    args = parser.parse_args(argv)
    if args.camera:
        args.repeats = args.repeats or 5
        camera_benchmark(args)
        return

    num_videos = 3 if args.quick else args.videos
    lengths = np.linspace(8, 16, num_videos) if args.quick else np.linspace(20, 60, num_videos)
    repeats = 1 if args.quick else (args.repeats or 2)

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        videos = [make_video(folder / f"video{i}.mp4", float(s), seed=i) for i, s in enumerate(lengths)]
        total_frames = sum(count_frames(v) for v in videos)
        print(f"generated {num_videos} videos, 640x360 30 fps GOP 250, {total_frames} frames "
              f"({total_frames / 30:.0f} s) in {time.perf_counter() - start:.1f} s")  # fmt: skip

        methods: dict[str, Callable[[Path, list[int]], torch.Tensor]] = {
            "ours (seek + short_side=224)": lambda p, idx: decode_frames(p, indices=idx, short_side=SHORT_SIDE),
            "ours, full size (seek only)": lambda p, idx: decode_frames(p, indices=idx),
            "PyAV full decode": full_decode,
            "PyAV full decode, 1 swscale": full_decode_shared_reformatter,
        }
        reader = decord_reader()
        if reader is not None:
            methods["decord get_batch (resize)"] = reader
        seconds = {name: 0.0 for name in methods}
        identical = True
        for video in videos:
            indices = uniform_indices(count_frames(video), NUM_FRAMES).tolist()
            outputs = {}
            for name, method in methods.items():  # interleaved per video: same cache state for all
                best = float("inf")
                for _ in range(repeats):
                    tic = time.perf_counter()
                    outputs[name] = method(video, indices)
                    best = min(best, time.perf_counter() - tic)
                seconds[name] += best
            identical &= torch.equal(outputs["ours, full size (seek only)"], outputs["PyAV full decode"])

    baseline = seconds["PyAV full decode"]
    print(f"\n{NUM_FRAMES} frames per video (uniform_indices), {num_videos} videos, best of {repeats}")
    print(f"{'method':<30} {'s/video':>9} {'frames/s':>10} {'speed-up vs full':>17}")
    for name, total in seconds.items():
        per_video, frames_per_s = total / num_videos, NUM_FRAMES * num_videos / total
        print(f"{name:<30} {per_video:>9.3f} {frames_per_s:>10.1f} {baseline / total:>16.2f}x")
    if reader is None:
        print("decord not installed")
    print(f"ours (full size) frames identical to the full decode: {'yes' if identical else 'NO'}")


if __name__ == "__main__":
    main()
