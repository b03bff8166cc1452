"""``mama augment``: caption every video of an annotation file with a LLaVA model, resumably.

Output: one JSON line per video, appended as each batch finishes::

    {"video_id": "video7", "video": "/data/msrvtt/videos/video7.mp4", "captions": ["...", "..."],
     "model": "llava-hf/llava-1.5-7b-hf", "prompt": "...", "generation": {...},
     "keyframes": [0, 31, ...], "num_frames": 300}

- **Resume.** A re-run skips the videos already in the output (and those listed as bad), so an
  interrupted job loses at most the batch in flight. A batch's lines go out in one ``write`` on an
  append-only file, so a killed job leaves whole lines; a torn last line (a crash of the machine itself)
  is cut off, with a warning, when the job starts again.
- **Bad videos** go to the sidecar ``<out>.bad.jsonl`` (``{"video_id", "video", "error"}``), never stop
  the job, and are not retried unless the sidecar is deleted.
- **Shards.** ``shard=(i, n)`` takes every n-th video of the annotation file from position i, and writes
  ``<stem>.shard-<i>-of-<n><suffix>``; under torchrun without an explicit shard, the rank and world size
  choose it. :func:`merge` joins the shard files by video id.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mama.augment.captioner import CaptionConfig, LlavaCaptioner
from mama.augment.keyframes import extract_keyframes, tile_grid
from mama.data.clips import map_in_workers
from mama.data.records import VideoRecord, write_jsonl
from mama.data.video import VideoDecodeError, decode_frames

__all__ = ["KeyframeConfig", "augment", "find_shards", "merge", "parse_shard", "shard_output"]


@dataclass(frozen=True)
class KeyframeConfig:
    """How each video becomes the captioner's input (method.md section 3)."""

    num: int = 12
    threshold: float = 0.1
    rows: int = 3
    cols: int = 4
    tile_short_side: int = 224  # each keyframe's shorter side in the grid


@dataclass
class _Prepare:
    """Picklable ``record -> (keyframes, grid or frames) | error`` for worker processes."""

    cfg: KeyframeConfig
    multi_frame: bool

    def __call__(self, record: VideoRecord) -> dict[str, Any]:
        try:
            keyframes = extract_keyframes(record.video, num=self.cfg.num, threshold=self.cfg.threshold)
            frames = decode_frames(record.video, indices=keyframes.keyframes, short_side=self.cfg.tile_short_side)
            image = frames if self.multi_frame else tile_grid(frames, self.cfg.rows, self.cfg.cols)
            return {"keyframes": keyframes.keyframes, "num_frames": keyframes.num_frames, "image": image}
        except (VideoDecodeError, ValueError) as exc:
            return {"error": str(exc)}


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"I/N"`` -> (I, N); None -> the torchrun rank and world size, or (0, 1)."""
    if text is None:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    index, sep, count = text.partition("/")
    try:
        shard = (int(index), int(count))
    except ValueError:
        raise ValueError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if not sep or not 0 <= shard[0] < shard[1]:
        raise ValueError(f"--shard must look like I/N with 0 <= I < N, got {text!r}")
    return shard


def shard_output(out: Path, shard: tuple[int, int]) -> Path:
    """The output file of one shard (``out`` itself when there is a single shard)."""
    index, count = shard
    return out if count == 1 else out.with_name(f"{out.stem}.shard-{index}-of-{count}{out.suffix}")


def _bad_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.bad{out.suffix or '.jsonl'}")


def _read_ids(path: Path) -> set[str]:
    """Video ids of a JSONL output, cutting off a torn last line first (see the module docstring)."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        warnings.warn(f"{path}: cutting off a torn last line ({len(data) - keep} bytes) left by a crash", stacklevel=3)
        with path.open("r+b") as handle:
            handle.truncate(keep)
        data = data[:keep]
    ids = set()
    for line_no, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                ids.add(json.loads(line)["video_id"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{line_no}: not a caption line ({exc}); is this the right --out file?") from None
    return ids


def _append(path: Path, lines: Sequence[dict[str, Any]]) -> None:
    if not lines:
        return
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")
    # One write on an O_APPEND descriptor: a killed process leaves all of these lines or none.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, text)
        while written < len(text):  # a short write (rare, e.g. a full disk) is completed, not torn
            written += os.write(fd, text[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def augment(
    records: Sequence[VideoRecord],
    out: str | os.PathLike[str],
    caption_cfg: CaptionConfig,
    keyframe_cfg: KeyframeConfig = KeyframeConfig(),
    shard: tuple[int, int] = (0, 1),
    workers: int = 0,
    progress: bool = True,
    captioner: LlavaCaptioner | None = None,
) -> dict[str, Any]:
    """Caption the videos of ``records`` (this shard's share) that ``out`` does not hold yet.

    Args:
        records: the annotation file's records (any format the data readers know).
        out: output JSONL (for several shards, the name the shard files derive from).
        workers: processes extracting keyframes while the model captions.
        captioner: an already loaded captioner (default: loaded from ``caption_cfg``).

    Returns:
        ``{"out", "bad_file", "shard", "videos", "already_done", "captioned", "bad", "no_caption"}``.
    """
    path = shard_output(Path(out), shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    bad_path = _bad_path(path)
    mine = list(records)[shard[0] :: shard[1]]
    done = _read_ids(path) | _read_ids(bad_path)
    todo = [r for r in mine if r.id not in done]
    summary: dict[str, Any] = {
        "out": str(path), "bad_file": str(bad_path), "shard": f"{shard[0]}/{shard[1]}",
        "videos": len(mine), "already_done": len(mine) - len(todo), "captioned": 0, "bad": 0, "no_caption": 0,
    }  # fmt: skip
    if not todo:
        return summary
    captioner = captioner or LlavaCaptioner(caption_cfg)
    cfg = captioner.cfg
    header = {"model": cfg.model, "prompt": cfg.prompt, "generation": cfg.generation()}
    prepared = map_in_workers(_Prepare(keyframe_cfg, cfg.multi_frame), todo, workers)
    bar = tqdm(total=len(todo), desc=f"augment {path.name}", unit="video", disable=not progress)
    batch: list[tuple[VideoRecord, dict[str, Any]]] = []

    def flush() -> None:
        if not batch:
            return
        captions = captioner.caption([item["image"] for _, item in batch])
        lines = []
        for (record, item), texts in zip(batch, captions, strict=True):
            lines.append({
                "video_id": record.id, "video": str(record.video), "captions": texts, **header,
                "keyframes": item["keyframes"], "num_frames": item["num_frames"],
            })  # fmt: skip
            summary["no_caption"] += not texts
        _append(path, lines)
        summary["captioned"] += len(lines)
        bar.update(len(batch))
        batch.clear()

    for record, item in zip(todo, prepared, strict=True):
        if "error" in item:
            warnings.warn(f"skipping video {item['error']}", stacklevel=2)
            _append(bad_path, [{"video_id": record.id, "video": str(record.video), "error": item["error"]}])
            summary["bad"] += 1
            bar.update(1)
            continue
        batch.append((record, item))
        if len(batch) == cfg.batch_size:
            flush()
    flush()
    bar.close()
    return summary


def merge(shards: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str]) -> dict[str, Any]:
    """Join shard outputs (and their bad-video sidecars) into ``out`` by video id, atomically.

    A video found in several shards (e.g. a re-sharded job) is kept once, from the first shard that has
    it; every line must parse (a torn line means a shard is still running or crashed: finish it first).
    """
    lines: dict[str, dict[str, Any]] = {}
    bad: dict[str, dict[str, Any]] = {}
    duplicates = 0
    for shard in map(Path, shards):
        for target, source in ((lines, shard), (bad, _bad_path(shard))):
            if not source.exists():
                if target is lines:
                    raise FileNotFoundError(f"{source}: shard output not found")
                continue
            for line_no, text in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                    video_id = obj["video_id"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ValueError(f"{source}:{line_no}: not a caption line ({exc}); is the shard finished?") from None
                if video_id in target:
                    duplicates += 1
                    continue
                target[video_id] = obj
    out = Path(out)
    write_jsonl(out, lines.values())
    if bad:
        write_jsonl(_bad_path(out), (v for k, v in bad.items() if k not in lines))
    return {"out": str(out), "shards": len(shards), "videos": len(lines), "bad": len(set(bad) - set(lines)), "duplicates": duplicates}


def find_shards(out: Path) -> list[Path]:
    """The shard files of ``out`` (``<stem>.shard-<i>-of-<n><suffix>``), all of one shard count, in order."""
    found = sorted(out.parent.glob(f"{out.stem}.shard-*-of-*{out.suffix}"))
    found = [p for p in found if ".bad" not in p.name]
    counts = {p.stem.rsplit("-of-", 1)[-1] for p in found}
    if len(counts) > 1:
        raise ValueError(f"{out}: shard files of different shard counts {sorted(counts)}; name them explicitly")
    if not found:
        raise FileNotFoundError(f"no shard files {out.stem}.shard-*-of-*{out.suffix} next to {out}")
    count = int(counts.pop())
    expected = [shard_output(out, (i, count)) for i in range(count)]
    missing = [str(p) for p in expected if p not in found]
    if missing:
        raise FileNotFoundError(f"missing shard outputs: {missing}")
    return expected
