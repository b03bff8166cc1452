"""Keyframe grid: our streaming extraction against the authors' keep-every-frame approach.

Generates H.264 videos with scene cuts at known frames into a temporary folder: 640x360 at 30 fps
(20 and 40 s; with ``--quick`` 8 and 16 s) and a long low-resolution pair at 160x90 (30 s and 10 min;
``--quick``: 10 s and 2 min), then measures, each in a fresh subprocess:

1. ours: ``keyframe_grid(path)``: one streaming decode at 64 px short side for the difference signal,
   then only the 12 keyframes decoded at 224 px short side;
2. ours at full resolution: the same with ``analysis_size=None`` (the authors' analysis resolution,
   still streaming), which separates the effect of the resolution from that of streaming;
3. naive, what the authors' demo does: decode every frame at full size into a list and keep them all,
   grayscale + 9x9 blur + saturating difference at full size, then pick the keyframes from the list
   and tile them at full size. It uses the same arithmetic (gray, blur, peaks, choice) as ours, so any
   difference in the chosen frames comes from the analysis resolution alone.

Peak RSS is ``ru_maxrss`` of the subprocess after the run minus its value after the imports (the extra
memory the work needed). Prints a table, the ours/naive ratios of time and memory, whether the methods
chose the same keyframes, how many of the true cuts each found (a peak within 1 frame), how our
peak memory changes from the short to the long low-resolution video, and, on the 640x360 videos, what
keeping the 9x9 blur unscaled at 64 px would cost in found cuts.

    python benchmarks/keyframes.py [--quick] [--keep DIR]

With ``--camera`` it instead measures camera-like clips (``benchmarks/camera_videos.py``: 1080p and
4K, H.264 and HEVC with B-frames, one GOP; ``--camera-seconds`` long, 4 by default; with ``--keep DIR``
the clips are kept there and reused by later runs), side by side and interleaved over ``--repeats``
rounds (medians of wall time, and of CPU time, which other jobs on the machine disturb less):

- process wall time of ``mama keyframes CLIP --json`` (the console script, which imports no torch),
  of the same command in a process that imports torch first (what every ``mama`` command paid
  before the command line became lazy), of a process that only decodes every frame with PyAV
  (frame threads, as the keyframe pass), and of ``python -c "import torch"``;
- the authors' detector as a process: our OpenCV re-implementation of what MAMA's LVLM demo runs
  (``demo_lvlm.py`` calling ``keyframeDetection`` of video-keyframe-detector): ``cv2.VideoCapture``
  reads every frame, full-size ``cvtColor`` to gray, ``GaussianBlur`` 9x9, ``cv2.subtract`` with the
  previous blurred frame and ``countNonZero``, every gray frame kept in a list, peaks of the signal
  (our :func:`~mama.augment.keyframes.find_peaks`, the peakutils rule they call), and each peak frame
  written as a JPEG; plus a process that only reads every frame with ``cv2.VideoCapture``;
- in-process: :func:`mama.augment.keyframes.extract_keyframes` against decoding every frame of the
  same file with the same threading (the decode floor), the same cv2 detector, and cv2 reading
  every frame.

    python benchmarks/keyframes.py --camera [--camera-sizes 1080p,4k] [--camera-codecs h264,hevc]
                                   [--camera-seconds 4] [--repeats 5] [--keep DIR]

OpenCV (``opencv-python-headless``) comes with the ``bench`` extra (``pip install -e ".[bench]"``);
without it the cv2 rows are skipped and the benchmark says so.

Run it alone: a second busy process on 2 cores distorts the timings.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

NUM_KEYFRAMES = 12
THRESHOLD = 0.1
METHODS = ("ours", "ours_fullres", "naive")


@dataclass(frozen=True)
class BenchVideo:
    name: str
    path: Path
    num_frames: int
    cuts: list[int]


def make_video(path: Path, seconds: float, height: int, width: int, seed: int, fps: int = 30) -> tuple[int, list[int]]:
    """Encode scenes of 1.5-4 s with hard cuts, streaming (no frame list), and return (frames, cuts).

    Each scene is a static sinusoidal texture of its own frequencies and phase with a box of its own
    colour moving across it: motion inside scenes, a whole-frame change at each cut.
    """
    rng = np.random.default_rng(seed)
    num_frames = int(seconds * fps)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    box_h, box_w = max(4, height // 6), max(4, width // 8)
    cuts: list[int] = []
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        frame_idx = 0
        while frame_idx < num_frames:
            if frame_idx:
                cuts.append(frame_idx)
            fx, fy = rng.uniform(2.0, 12.0, size=2) * 2 * np.pi / np.array([width, height])
            phase = rng.uniform(0, 2 * np.pi)
            mean = rng.uniform(60, 190, size=3)
            texture = np.stack(
                [mean[c] + 50 * np.sin(fx * xs + phase + c) * np.cos(fy * ys + 2 * c) for c in range(3)], axis=-1
            )
            texture = np.clip(texture, 0, 255).astype(np.uint8)  # (H, W, 3)
            colour = rng.integers(0, 256, size=3).astype(np.uint8)
            speed = rng.integers(1, 4)
            length = min(int(rng.uniform(1.5, 4.0) * fps), num_frames - frame_idx)
            for step in range(length):
                rgb = texture.copy()
                y = (speed * step) % (height - box_h)
                x = (2 * speed * step) % (width - box_w)
                rgb[y : y + box_h, x : x + box_w] = colour
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts = frame_idx
                frame.time_base = Fraction(1, fps)
                for packet in stream.encode(frame):
                    container.mux(packet)
                frame_idx += 1
        for packet in stream.encode(None):
            container.mux(packet)
    return num_frames, cuts


def run_naive(path: Path) -> tuple[list[int], list[int], tuple[int, ...]]:
    """The authors' structure: every full-size frame kept in a list, analysed at full size."""
    from av.video.reformatter import VideoReformatter

    from mama.augment.keyframes import (
        _brightened_pixels,
        _gaussian_blur,
        _to_gray,
        choose_keyframes,
        find_peaks,
        tile_grid,
    )

    frames: list[np.ndarray] = []
    values: list[float] = []
    previous: np.ndarray | None = None
    reformatter = VideoReformatter()  # a fair baseline: no swscale context per frame
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            rgb = reformatter.reformat(frame, format="rgb24").to_ndarray()
            frames.append(rgb)
            blurred = _gaussian_blur(_to_gray(rgb))
            values.append(0.0 if previous is None else float(_brightened_pixels(blurred, previous)))
            previous = blurred
    peaks = find_peaks(np.asarray(values), THRESHOLD)
    keyframes = choose_keyframes(peaks, len(frames), NUM_KEYFRAMES)
    grid = tile_grid(np.stack([frames[i] for i in keyframes]), 3, 4)
    return peaks, keyframes, tuple(grid.shape)


def signal_fixed_kernel(path: Path, analysis_size: int) -> np.ndarray:
    """Difference signal at ``analysis_size`` with the 9x9 kernel kept in analysis pixels (not scaled)."""
    from av.video.reformatter import VideoReformatter

    from mama.augment.keyframes import (
        _analysis_size,
        _brightened_pixels,
        _gaussian_blur,
        _to_gray,
    )

    values: list[float] = []
    previous: np.ndarray | None = None
    reformatter = VideoReformatter()
    with av.open(str(path)) as container:
        for frame in container.decode(container.streams.video[0]):
            height, width = _analysis_size(frame.height, frame.width, analysis_size)
            rgb = reformatter.reformat(frame, format="rgb24", width=width, height=height).to_ndarray()
            blurred = _gaussian_blur(_to_gray(rgb))
            values.append(0.0 if previous is None else float(_brightened_pixels(blurred, previous)))
            previous = blurred
    return np.asarray(values)


def analysis_resolution_check(videos: list[BenchVideo]) -> None:
    """Cut recall of the analysis at 64 px with the blur scaled (ours) or fixed at 9x9, and at full size."""
    from mama.augment.keyframes import difference_signal, find_peaks

    print("\nanalysis resolution and blur (cuts found within 1 frame, other peaks):")
    for video in videos:
        variants = {
            "64 px, scaled blur (ours)": difference_signal(video.path, analysis_size=64)[0],
            "64 px, fixed 9x9 blur": signal_fixed_kernel(video.path, 64),
            "full size, 9x9 blur": difference_signal(video.path, analysis_size=None)[0],
        }
        summary = "; ".join(
            f"{name}: {cut_recall(find_peaks(signal, THRESHOLD), video.cuts)}" for name, signal in variants.items()
        )
        print(f"  {video.name:<14} {summary}")


def worker(method: str, path: Path) -> None:
    """Run one method once and print a JSON line with time, extra peak RSS and the result."""
    import torch  # noqa: F401  (imported before the baseline, as the library imports it anyway)

    from mama.augment.keyframes import keyframe_grid

    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if method == "naive":
        peaks, keyframes, shape = run_naive(path)
    else:
        analysis_size = 64 if method == "ours" else None
        result, grid = keyframe_grid(path, num=NUM_KEYFRAMES, threshold=THRESHOLD, analysis_size=analysis_size)
        peaks, keyframes, shape = result.peaks, result.keyframes, tuple(grid.shape)
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "seconds": seconds,
                "extra_rss_mb": (peak_kb - baseline_kb) / 1024,
                "baseline_rss_mb": baseline_kb / 1024,
                "peaks": peaks,
                "keyframes": keyframes,
                "grid_shape": shape,
            }
        )
    )


def measure(method: str, path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", method, str(path)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def cut_recall(peaks: list[int], cuts: list[int]) -> str:
    found = sum(any(abs(p - c) <= 1 for p in peaks) for c in cuts)
    far = sum(not any(abs(p - c) <= 1 for c in cuts) for p in peaks)
    return f"{found}/{len(cuts)} cuts, {far} other"


_DECODE_ONLY = """
import sys, av
container = av.open(sys.argv[1])
stream = container.streams.video[0]
stream.thread_type = "AUTO"
for frame in container.decode(stream):
    pass
"""

_CV2_READ_ONLY = """
import sys, cv2
capture = cv2.VideoCapture(sys.argv[1])
while capture.read()[0]:
    pass
"""


def cv2_available() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def cv2_detector(path: Path, out_dir: Path, threshold: float = THRESHOLD) -> list[int]:
    """The authors' keyframe detector, re-implemented with OpenCV: returns the peak frame indices.

    Full-size analysis of every frame read by ``cv2.VideoCapture`` (BGR), as video-keyframe-detector's
    ``keyframeDetection`` does: gray, 9x9 Gaussian blur, saturating difference with the previous blurred
    frame, count of non-zero pixels; every gray frame is kept to write the peaks afterwards (their
    structure: memory grows with the video); the peaks, found with the peakutils rule
    (:func:`~mama.augment.keyframes.find_peaks`), are written to ``out_dir`` as JPEG files.
    """
    import cv2

    from mama.augment.keyframes import find_peaks

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise RuntimeError(f"{path}: OpenCV cannot open the video")
    grays: list[np.ndarray] = []
    counts: list[float] = []
    previous: np.ndarray | None = None
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
        blurred = cv2.GaussianBlur(gray, (9, 9), 0)
        counts.append(0.0 if previous is None else float(cv2.countNonZero(cv2.subtract(blurred, previous))))
        grays.append(gray)
        previous = blurred
    capture.release()
    peaks = find_peaks(np.asarray(counts), threshold)
    for number, index in enumerate(peaks, start=1):
        cv2.imwrite(str(out_dir / f"keyframe{number}.jpg"), grays[index])
    return peaks


def _cv2_detector_worker(path: Path) -> None:
    """``--cv2-detector PATH``: run :func:`cv2_detector` into a temporary folder, print the peaks as JSON."""
    with tempfile.TemporaryDirectory() as out_dir:
        print(json.dumps(cv2_detector(path, Path(out_dir))))


def _cv2_read_every_frame(path: Path) -> int:
    import cv2

    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count


def _mama_command() -> list[str]:
    script = Path(sys.executable).with_name("mama")  # the console script a user runs
    return [str(script)] if script.exists() else [sys.executable, "-m", "mama.cli"]


def _process_commands(path: Path, with_cv2: bool) -> dict[str, list[str]]:
    keyframes = ["keyframes", str(path), "--json"]
    with_torch = f"import sys, torch; from mama.cli import main; sys.exit(main({keyframes!r}))"
    commands = {
        "mama keyframes": _mama_command() + keyframes,
        "... after import torch": [sys.executable, "-c", with_torch],
        "decode-only process": [sys.executable, "-c", _DECODE_ONLY, str(path)],
        "import torch": [sys.executable, "-c", "import torch"],
    }
    if with_cv2:
        commands["authors' detector (cv2)"] = [sys.executable, __file__, "--cv2-detector", str(path)]
        commands["cv2 read-only process"] = [sys.executable, "-c", _CV2_READ_ONLY, str(path)]
    return commands


def _decode_every_frame(path: Path) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return sum(1 for _ in container.decode(stream))


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def camera_benchmark(args: argparse.Namespace) -> None:
    """The ``--camera`` mode (module doc)."""
    import statistics

    from camera_videos import camera_clips
    from mama.augment.keyframes import extract_keyframes

    with_cv2 = cv2_available()
    if not with_cv2:
        print("OpenCV (cv2) is not installed: skipping the cv2 rows (pip install -e '.[bench]')")
    clip_set = camera_clips(args.keep, args.camera_sizes, args.camera_codecs, args.camera_seconds)
    with clip_set as clips, tempfile.TemporaryDirectory() as tmp:  # tmp: the cv2 detector's JPEG files
        print(
            f"medians of {args.repeats} interleaved rounds (wall s, CPU s = user + sys of all threads); "
            "ratios of wall time against the decode floor of the same clip"
        )
        summary: list[str] = []
        for clip in clips:
            name = f"{clip.width}x{clip.height} {clip.codec} {clip.num_frames} frames"
            commands = _process_commands(clip.path, with_cv2)
            inproc_methods = {
                "extract_keyframes": lambda p=clip.path: extract_keyframes(p, num=NUM_KEYFRAMES, threshold=THRESHOLD),
                "decode every frame": lambda p=clip.path: _decode_every_frame(p),
            }
            if with_cv2:
                inproc_methods["cv2 detector"] = lambda p=clip.path: cv2_detector(p, Path(tmp))
                inproc_methods["cv2 read every frame"] = lambda p=clip.path: _cv2_read_every_frame(p)
            wall: dict[str, list[float]] = {f"process  {label}": [] for label in commands}
            wall |= {f"in-proc  {label}": [] for label in inproc_methods}
            cpu: dict[str, list[float]] = {label: [] for label in wall}
            keyframes = cv2_peaks = None
            for _ in range(args.repeats):
                for label, cmd in commands.items():
                    t0, c0 = time.perf_counter(), _children_cpu()
                    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                    wall[f"process  {label}"].append(time.perf_counter() - t0)
                    cpu[f"process  {label}"].append(_children_cpu() - c0)
                    if label == "mama keyframes":
                        keyframes = json.loads(done.stdout)
                    elif label.startswith("authors'"):
                        cv2_peaks = json.loads(done.stdout)
                for label, method in inproc_methods.items():
                    t0, c0 = time.perf_counter(), time.process_time()
                    method()
                    wall[f"in-proc  {label}"].append(time.perf_counter() - t0)
                    cpu[f"in-proc  {label}"].append(time.process_time() - c0)
            result = extract_keyframes(clip.path, num=NUM_KEYFRAMES, threshold=THRESHOLD)
            assert keyframes is not None and keyframes["keyframes"] == result.keyframes
            print(f"\n{name}: cuts {clip.cuts} (darker {clip.darker_cuts})")
            print(f"  mama keyframes: {len(result.peaks)} peaks, {cut_recall(result.peaks, clip.cuts)}")
            if cv2_peaks is not None:
                print(f"  authors' detector (full size): {len(cv2_peaks)} peaks, {cut_recall(cv2_peaks, clip.cuts)}")
            med = {label: statistics.median(values) for label, values in wall.items()}
            process_floor, inproc_floor = med["process  decode-only process"], med["in-proc  decode every frame"]
            for label, seconds in med.items():
                floor = process_floor if label.startswith("process") else inproc_floor
                print(
                    f"  {label:<33} {seconds:7.2f} s  {seconds / floor:5.2f}x"
                    f"   CPU {statistics.median(cpu[label]):6.2f} s"
                )
            ours = med["process  mama keyframes"]
            line = f"{name}: mama keyframes {ours / process_floor:.2f}x the decode-only process"
            line += f", extract_keyframes {med['in-proc  extract_keyframes'] / inproc_floor:.2f}x the decode floor"
            if with_cv2:
                detector = med["process  authors' detector (cv2)"]
                line += f", {detector / ours:.2f}x faster than the authors' detector"
            summary.append(line)
        print("\nsummary (goals: mama keyframes <= 1.3x decode-only, >= 1.5x faster than the authors' detector;")
        print("extract_keyframes <= 1.15x the decode floor):")
        for line in summary:
            print(f"  {line}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter videos (about a minute in all)")
    parser.add_argument("--keep", type=Path, default=None, help="write the videos here and keep them")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--cv2-detector", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--camera", action="store_true", help="camera-like clips: process wall time and decode floor")
    parser.add_argument("--camera-sizes", default="1080p,4k")
    parser.add_argument("--camera-codecs", default="h264,hevc")
    parser.add_argument("--camera-seconds", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=5, help="--camera: interleaved rounds (medians)")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]))
        return
    if args.cv2_detector:
        _cv2_detector_worker(args.cv2_detector)
        return
    if args.camera:
        camera_benchmark(args)
        return

    specs = (
        [
            ("640x360 8s", 8, 360, 640),
            ("640x360 16s", 16, 360, 640),
            ("160x90 10s", 10, 90, 160),
            ("160x90 2min", 120, 90, 160),
        ]
        if args.quick
        else [
            ("640x360 20s", 20, 360, 640),
            ("640x360 40s", 40, 360, 640),
            ("160x90 30s", 30, 90, 160),
            ("160x90 10min", 600, 90, 160),
        ]
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        videos: list[BenchVideo] = []
        for seed, (name, seconds, height, width) in enumerate(specs):
            path = folder / f"{name.replace(' ', '_')}.mp4"
            start = time.perf_counter()
            num_frames, cuts = make_video(path, seconds, height, width, seed)
            print(
                f"generated {name}: {num_frames} frames, {len(cuts)} cuts, {time.perf_counter() - start:.1f} s",
                flush=True,
            )
            videos.append(BenchVideo(name, path, num_frames, cuts))

        results: dict[tuple[str, str], dict] = {}
        header = f"{'video':<14}{'frames':>7}  {'method':<13}{'time s':>8}{'peak RSS MB':>13}{'peaks':>7}  {'cuts found':<25}same keyframes as naive"
        print()
        print(header)
        print("-" * len(header))
        for video in videos:
            for method in METHODS:
                result = measure(method, video.path)
                results[(video.name, method)] = result
            naive = results[(video.name, "naive")]
            for method in METHODS:
                result = results[(video.name, method)]
                same = "-" if method == "naive" else ("yes" if result["keyframes"] == naive["keyframes"] else "no")
                print(
                    f"{video.name:<14}{video.num_frames:>7}  {method:<13}{result['seconds']:>8.2f}"
                    f"{result['extra_rss_mb']:>13.1f}{len(result['peaks']):>7}  "
                    f"{cut_recall(result['peaks'], video.cuts):<25}{same}",
                    flush=True,
                )

        print("\nratios ours / naive (time, peak RSS):")
        for video in videos:
            ours, full, naive = (results[(video.name, m)] for m in METHODS)
            print(
                f"  {video.name:<14} ours {ours['seconds'] / naive['seconds']:.2f}x time, "
                f"{ours['extra_rss_mb'] / max(naive['extra_rss_mb'], 1e-3):.3f}x memory; "
                f"ours_fullres {full['seconds'] / naive['seconds']:.2f}x time, "
                f"{full['extra_rss_mb'] / max(naive['extra_rss_mb'], 1e-3):.3f}x memory"
            )
        print("\nkeyframes chosen:")
        for video in videos:
            for method in METHODS:
                print(f"  {video.name:<14} {method:<13} {results[(video.name, method)]['keyframes']}")
        short, long = videos[2], videos[3]
        print(
            f"\npeak RSS growth with length at 160x90 ({short.num_frames} -> {long.num_frames} frames): "
            + ", ".join(
                f"{m} {results[(short.name, m)]['extra_rss_mb']:.1f} -> {results[(long.name, m)]['extra_rss_mb']:.1f} MB"
                for m in METHODS
            )
        )
        print(f"baseline RSS after imports: {results[(videos[0].name, 'ours')]['baseline_rss_mb']:.0f} MB")
        analysis_resolution_check(videos[:2])


if __name__ == "__main__":
    main()
