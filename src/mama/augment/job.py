"""``mama augment``: caption every video of an annotation file (or of WebDataset shards) with a LLaVA
model, resumably.

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
- **Shards.** ``shard=(i, n)`` takes the videos whose id hashes to i modulo n (stable when the annotation
  file is edited) and writes ``<name>.shard-<i>-of-<n>.jsonl``; under torchrun the rank and world size
  choose it. Videos done by any shard, or by an earlier unsharded run, are not redone. :func:`merge`
  joins the shard files by video id.
- **WebDataset input.** :func:`augment_shards` captions the samples of tar shards (``mama shard``'s
  layout) through the same loop: shard i goes to rank i modulo the world size, a sample's id is the
  ``"id"`` of its ``<key>.json`` (else its key) and its ``"video"`` is ``"<url>#<key>.<ext>"``.
- **Settings.** A file holds captions of one setting: resuming into it with another model, prompt,
  generation or keyframe setting is refused. The sampling seed of a batch comes from ``seed`` and its
  first video's id, so captions depend on which videos share a batch (as batched sampling does).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mama.augment.captioner import CaptionConfig, LlavaCaptioner
from mama.augment.keyframes import extract_keyframes, tile_grid
from mama.data.clips import map_in_workers
from mama.data.records import VideoRecord, write_jsonl
from mama.data.shards import ShardError, expand_urls, iter_tar_samples
from mama.data.video import VideoDecodeError, decode_frames

__all__ = ["KeyframeConfig", "augment", "augment_shards", "find_shards", "merge", "parse_shard", "shard_output"]


@dataclass(frozen=True)
class KeyframeConfig:
    """How each video becomes the captioner's input (the authors' LLaVA demo: a keyframe grid)."""

    num: int = 12
    threshold: float = 0.1
    rows: int = 3
    cols: int = 4
    tile_short_side: int = 224  # each keyframe's shorter side in the grid

    def __post_init__(self) -> None:
        # Checked once here: a bad setting must stop the job, not mark every video as broken.
        if self.num < 1 or self.rows < 1 or self.cols < 1 or self.rows * self.cols < self.num:
            raise ValueError(
                f"{self.num} keyframes need a grid of at least that many cells, got {self.rows} x {self.cols}"
            )
        if not 0 <= self.threshold < 1:
            raise ValueError(f"the keyframe threshold must be in [0, 1), got {self.threshold}")
        if self.tile_short_side < 1:
            raise ValueError(f"tile_short_side must be positive, got {self.tile_short_side}")


@dataclass
class PrepareCaptionInput:
    """Picklable ``record -> (keyframes, grid or frames) | error`` for worker processes: the captioner's
    input for one video (also used by ``mama caption`` on a single video)."""

    cfg: KeyframeConfig
    multi_frame: bool

    def __call__(self, record: VideoRecord) -> dict[str, Any]:
        try:
            keyframes = extract_keyframes(record.video, num=self.cfg.num, threshold=self.cfg.threshold)
            frames = decode_frames(record.video, indices=keyframes.keyframes, short_side=self.cfg.tile_short_side)
            image = frames if self.multi_frame else tile_grid(frames, self.cfg.rows, self.cfg.cols)
            return {"keyframes": keyframes.keyframes, "num_frames": keyframes.num_frames, "image": image}
        except VideoDecodeError as exc:
            return {"error": str(exc)}
        except Exception as exc:  # one unexpected failure must not stop (and on resume re-stop) the whole job
            return {"error": f"{record.video}: {type(exc).__name__}: {exc}"}


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"I/N"`` -> (I, N); None -> the torchrun rank and world size, or (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if text is None:
        rank = int(os.environ.get("RANK", "0"))
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is not within WORLD_SIZE={world}")
        return rank, world
    if world > 1:
        raise ValueError(
            "--shard splits the work by hand; under torchrun each rank already takes its own shard: drop --shard"
        )
    index, sep, count = text.partition("/")
    try:
        shard = (int(index), int(count))
    except ValueError:
        raise ValueError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if not sep or not 0 <= shard[0] < shard[1]:
        raise ValueError(f"--shard must look like I/N with 0 <= I < N, got {text!r}")
    return shard


def _split_name(out: Path) -> tuple[str, str]:
    """(base, ".jsonl") for "x.jsonl"; (name, "") for a name without the suffix."""
    return (out.name[: -len(".jsonl")], ".jsonl") if out.name.endswith(".jsonl") else (out.name, "")


def shard_output(out: Path, shard: tuple[int, int]) -> Path:
    """The output file of one shard (``out`` itself when there is a single shard)."""
    index, count = shard
    base, suffix = _split_name(out)
    return out if count == 1 else out.with_name(f"{base}.shard-{index}-of-{count}{suffix}")


def _bad_path(out: Path) -> Path:
    base, suffix = _split_name(out)
    return out.with_name(f"{base}.bad{suffix or '.jsonl'}")


def _shard_files(out: Path) -> dict[tuple[int, int], Path]:
    """Every shard output next to ``out``: {(index, count): path}."""
    base, suffix = _split_name(out)
    pattern = re.compile(re.escape(base) + r"\.shard-(\d+)-of-(\d+)" + re.escape(suffix))
    found = {}
    if out.parent.is_dir():
        for path in out.parent.iterdir():
            match = pattern.fullmatch(path.name)
            if match:
                found[(int(match[1]), int(match[2]))] = path
    return found


def _owner(video_id: str, count: int) -> int:
    """The shard of a video: a stable hash of its id, so editing the annotation file moves no video."""
    return int.from_bytes(hashlib.blake2b(video_id.encode(), digest_size=8).digest(), "little") % count


def _read_ids(path: Path, repair: bool = True) -> set[str]:
    """Video ids of a JSONL output, cutting off a torn last line first (see the module docstring)."""
    return set(_read_lines(path, repair))


def _read_lines(path: Path, repair: bool = True) -> dict[str, dict[str, Any]]:
    """{video_id: line} of a JSONL output; with ``repair``, a torn last line is cut off first."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n") and repair:
        keep = data.rfind(b"\n") + 1
        warnings.warn(f"{path}: cutting off a torn last line ({len(data) - keep} bytes) left by a crash", stacklevel=3)
        with path.open("r+b") as handle:
            handle.truncate(keep)
        data = data[:keep]
    lines: dict[str, dict[str, Any]] = {}
    for line_no, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                obj = json.loads(line)
                lines[obj["video_id"]] = obj
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                if not repair and line_no == len(data.splitlines()):
                    continue  # another process's line in flight
                raise ValueError(
                    f"{path}:{line_no}: not a caption line ({exc}); is this the right --out file?"
                ) from None
    return lines


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


def _settings(line: dict[str, Any]) -> dict[str, Any]:
    """What makes captions comparable: model, prompt, generation (less batching/precision) and keyframes."""
    generation = {k: v for k, v in line.get("generation", {}).items() if k not in ("batch_size", "dtype", "device")}
    return {
        "model": line.get("model"),
        "prompt": line.get("prompt"),
        "generation": generation,
        "keyframe": line.get("keyframe"),
    }


def _seed_offset(video_id: str) -> int:
    # The sampling seed of a batch comes from its first video's id: stable across resumes and shards.
    return int.from_bytes(hashlib.blake2b(video_id.encode(), digest_size=4).digest(), "little")


def _open_output(
    out: Path, shard: tuple[int, int], caption_cfg: CaptionConfig, keyframe_cfg: KeyframeConfig
) -> tuple[Path, Path, set[str]]:
    """This process's output file, its bad-video sidecar and every id done by any output of ``out``.

    Raises:
        ValueError: ``out`` holds captions made with other settings.
    """
    path = shard_output(out, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    bad_path = _bad_path(path)
    path.touch()  # even a shard with nothing to do leaves its (empty) file, so --merge finds every shard
    own = _read_lines(path)
    # Other processes may be writing the other files: read them without repairing their tails.
    others = [out, *_shard_files(out).values()]
    done_lines = dict(own)
    for other in others:
        if other != path:
            done_lines.update(_read_lines(other, repair=False))
    done = (
        set(done_lines)
        | _read_ids(bad_path)
        | {i for o in others if o != path for i in _read_ids(_bad_path(o), repair=False)}
    )
    current = {
        "model": caption_cfg.model,
        "prompt": caption_cfg.prompt,
        "generation": caption_cfg.generation(),
        "keyframe": asdict(keyframe_cfg),
    }
    for line in list(done_lines.values())[:1]:
        if _settings(line) != _settings(current):
            theirs, ours = _settings(line), _settings(current)
            diff = {k: (theirs[k], ours[k]) for k in ours if theirs[k] != ours[k]}
            raise ValueError(
                f"{path}: holds captions made with other settings {diff} (saved, now); "
                "use another --out for these settings"
            )
    return path, bad_path, done


def _caption_all(
    items: Iterable[tuple[str, str, dict[str, Any]]],
    path: Path,
    bad_path: Path,
    load: Callable[[], LlavaCaptioner],
    keyframe_cfg: KeyframeConfig,
    summary: dict[str, Any],
    bar: tqdm,
) -> None:
    """Caption ``(video_id, video, prepared input)`` items in batches, appending each batch's lines to
    ``path`` and failed inputs (``{"error": ...}``) to ``bad_path``; the one loop both inputs share.

    ``load`` gives the captioner, called at the first batch: a finished job never loads the model.
    """
    header: dict[str, Any] = {}
    batch: list[tuple[str, str, dict[str, Any]]] = []

    def flush() -> None:
        if not batch:
            return
        captioner = load()
        if not header:
            generation = {
                **captioner.cfg.generation(),
                "dtype": str(captioner.dtype).removeprefix("torch."),
                "device": str(captioner.device),
            }
            header.update(model=captioner.cfg.model, prompt=captioner.cfg.prompt, generation=generation,
                          keyframe=asdict(keyframe_cfg))  # fmt: skip
        captions = captioner.caption([item["image"] for _, _, item in batch], offset=_seed_offset(batch[0][0]))
        lines = []
        for (video_id, video, item), texts in zip(batch, captions, strict=True):
            if not texts:
                summary["no_caption"] += 1
                continue
            lines.append({
                "video_id": video_id, "video": video, "captions": texts, **header,
                "keyframes": item["keyframes"], "num_frames": item["num_frames"],
            })  # fmt: skip
        _append(path, lines)
        summary["captioned"] += len(lines)
        bar.update(len(batch))
        batch.clear()

    for video_id, video, item in items:
        if "error" in item:
            warnings.warn(f"skipping video {item['error']}", stacklevel=3)
            _append(bad_path, [{"video_id": video_id, "video": video, "error": item["error"]}])
            summary["bad"] += 1
            bar.update(1)
            continue
        batch.append((video_id, video, item))
        if len(batch) == load().cfg.batch_size:
            flush()
    flush()
    if summary["no_caption"]:
        warnings.warn(
            f"{path}: {summary['no_caption']} video(s) got no caption past the length/repetition filters; "
            "they are not written and will be tried again on the next run (or change --seed / the filters)",
            stacklevel=3,
        )


def _loader(caption_cfg: CaptionConfig, captioner: LlavaCaptioner | None) -> Callable[[], LlavaCaptioner]:
    """The captioner given, or one loaded from ``caption_cfg`` on the first call (once)."""
    loaded = [captioner] if captioner is not None else []

    def load() -> LlavaCaptioner:
        if not loaded:
            loaded.append(LlavaCaptioner(caption_cfg))
        return loaded[0]

    return load


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
    """Caption the videos of ``records`` (this shard's share) that no output of ``out`` holds yet.

    Args:
        records: the annotation file's records (any format the data readers know).
        out: output JSONL (for several shards, the name the shard files derive from). Videos already in
            ``out``, in any of its shard files or in their bad-video sidecars count as done, so a job can
            move between one process and several shards without redoing work.
        workers: processes extracting keyframes while the model captions.
        captioner: an already loaded captioner (default: loaded from ``caption_cfg``).

    Returns:
        ``{"out", "bad_file", "shard", "videos", "already_done", "captioned", "bad", "no_caption"}``;
        a video whose generations were all filtered out is written nowhere (retried next time) and
        counted in ``no_caption``.

    Raises:
        ValueError: ``out`` holds captions made with other settings (model, prompt, generation or
            keyframe settings): write them to another file.
    """
    path, bad_path, done = _open_output(Path(out), shard, caption_cfg, keyframe_cfg)
    mine = [r for r in records if _owner(r.id, shard[1]) == shard[0]] if shard[1] > 1 else list(records)
    todo = [r for r in mine if r.id not in done]
    summary: dict[str, Any] = {
        "out": str(path), "bad_file": str(bad_path), "shard": f"{shard[0]}/{shard[1]}",
        "videos": len(mine), "already_done": len(mine) - len(todo), "captioned": 0, "bad": 0, "no_caption": 0,
    }  # fmt: skip
    if not todo:
        return summary
    load = _loader(caption_cfg, captioner)
    prepared = map_in_workers(PrepareCaptionInput(keyframe_cfg, load().cfg.multi_frame), todo, workers)
    items = ((r.id, str(r.video), item) for r, item in zip(todo, prepared, strict=True))
    with tqdm(total=len(todo), desc=f"augment {path.name}", unit="video", disable=not progress) as bar:
        _caption_all(items, path, bad_path, load, keyframe_cfg, summary, bar)
    return summary


def augment_shards(
    urls: str | Sequence[str],
    out: str | os.PathLike[str],
    caption_cfg: CaptionConfig,
    keyframe_cfg: KeyframeConfig = KeyframeConfig(),
    rank_world: tuple[int, int] | None = None,
    workers: int = 0,
    progress: bool = True,
    captioner: LlavaCaptioner | None = None,
) -> dict[str, Any]:
    """Caption the samples of WebDataset shards (``mama shard``'s or video2dataset's layout), resumably.

    The same job as :func:`augment` (batching, resume, settings check, bad-video sidecar, output
    naming and :func:`merge`), with the videos read from tar shards: shard ``i`` of the expanded
    ``urls`` belongs to rank ``i % world``, and the rank writes ``<name>.shard-<rank>-of-<world>.jsonl``
    (``out`` itself for one process). A sample's id is ``"id"`` of its ``<key>.json`` (the key when
    absent), and each line's ``"video"`` is ``"<url>#<key>.<ext>"``.

    One shard at a time, the video members still to caption are written to a temporary folder (under
    ``TMPDIR``: at most one shard's bytes on disk, none kept in memory), their keyframes are extracted
    (in ``workers`` processes) and the folder is deleted, also when the job stops on an error. A
    damaged sample (missing or corrupt member, bytes that do not decode) goes to the bad sidecar with
    a warning; a shard that cannot be read is skipped from there on with a warning and counted.

    Args:
        urls: a brace pattern (``shards/shard-{000000..000011}.tar``), a list of them, local paths,
            ``http(s)://`` URLs or ``pipe:`` commands (see :func:`mama.data.shards.expand_urls`).
        rank_world: (rank, world size); None: the torchrun rank and world size, or (0, 1).

    Returns:
        ``{"out", "bad_file", "shard", "shards", "unreadable_shards", "videos", "already_done",
        "captioned", "bad", "no_caption"}`` (as :func:`augment`; ``shards`` is this rank's shard count).

    Raises:
        ValueError: ``out`` holds captions made with other settings; ``urls`` expands to nothing.
    """
    rank, world = rank_world if rank_world is not None else parse_shard(None)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not within world size {world}")
    shard_urls = [u for i, u in enumerate(expand_urls(urls)) if i % world == rank]
    path, bad_path, done = _open_output(Path(out), (rank, world), caption_cfg, keyframe_cfg)
    summary: dict[str, Any] = {
        "out": str(path), "bad_file": str(bad_path), "shard": f"{rank}/{world}", "shards": len(shard_urls),
        "unreadable_shards": 0, "videos": 0, "already_done": 0, "captioned": 0, "bad": 0, "no_caption": 0,
    }  # fmt: skip
    load = _loader(caption_cfg, captioner)
    prepare = PrepareCaptionInput(keyframe_cfg, (captioner.cfg if captioner else caption_cfg).multi_frame)
    with (
        tqdm(total=0, desc=f"augment {path.name}", unit="video", disable=not progress) as bar,
        contextlib.closing(_shard_items(shard_urls, done, prepare, workers, summary, bar)) as items,
    ):
        # closing(): a job stopped mid-shard (an error, Ctrl-C) deletes that shard's temporary files now.
        _caption_all(items, path, bad_path, load, keyframe_cfg, summary, bar)
    return summary


def _shard_items(
    shard_urls: Sequence[str],
    done: set[str],
    prepare: PrepareCaptionInput,
    workers: int,
    summary: dict[str, Any],
    bar: tqdm,
) -> Generator[tuple[str, str, dict[str, Any]], None, None]:
    """``(video_id, "<url>#<key>.<ext>", prepared input or {"error"})`` of every sample still to do,
    in shard order, one shard's videos in a temporary folder at a time."""
    seen = set(done)
    for url in shard_urls:
        with tempfile.TemporaryDirectory(prefix="mama-augment-") as tmp:
            # (video_id, label, temporary file or the sample's error), in member order.
            entries: list[tuple[str, str, Path | str]] = []
            try:
                for sample in iter_tar_samples(url):
                    video_id = str(sample.meta["id"]) if sample.meta.get("id") is not None else sample.key
                    label = f"{url}#{sample.key}.{sample.video_ext}"
                    summary["videos"] += 1
                    if video_id in seen:
                        if video_id in done:
                            summary["already_done"] += 1
                        else:
                            warnings.warn(f"{label}: sample id {video_id!r} seen before; skipped", stacklevel=4)
                        continue
                    seen.add(video_id)
                    if sample.error is not None:
                        entries.append((video_id, label, f"{label}: {sample.error}"))
                        continue
                    # Numbered names: keys may hold slashes; the extension tells the decoder the container.
                    video = Path(tmp) / f"{len(entries):07d}.{sample.video_ext}"
                    video.write_bytes(sample.video)
                    entries.append((video_id, label, video))
            except ShardError as exc:
                warnings.warn(f"skipping the rest of shard {exc}", stacklevel=4)
                summary["unreadable_shards"] += 1
            bar.total = (bar.total or 0) + len(entries)
            bar.refresh()
            videos = [VideoRecord(video_id, file, []) for video_id, _, file in entries if isinstance(file, Path)]
            prepared = map_in_workers(prepare, videos, workers)
            try:
                for video_id, label, file in entries:
                    if not isinstance(file, Path):
                        yield video_id, label, {"error": file}
                        continue
                    item = next(prepared)
                    if "error" in item:  # name the shard member, not the temporary file
                        item = {"error": item["error"].replace(str(file), label)}
                    yield video_id, label, item
            finally:
                prepared.close()  # stops the keyframe workers before their files are deleted


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
                    raise ValueError(
                        f"{source}:{line_no}: not a caption line ({exc}); is the shard finished?"
                    ) from None
                if video_id in target:
                    duplicates += 1
                    continue
                target[video_id] = obj
    out = Path(out)
    write_jsonl(out, lines.values())
    still_bad = [v for k, v in bad.items() if k not in lines]
    if still_bad:
        write_jsonl(_bad_path(out), still_bad)
    else:
        _bad_path(out).unlink(missing_ok=True)  # a stale sidecar would make a resume skip those videos
    return {
        "out": str(out),
        "shards": len(shards),
        "videos": len(lines),
        "bad": len(set(bad) - set(lines)),
        "duplicates": duplicates,
    }


def find_shards(out: Path) -> list[Path]:
    """The shard files of ``out`` (``<name>.shard-<i>-of-<n>.jsonl``), all of one shard count, in order."""
    found = _shard_files(out)
    counts = {count for _, count in found}
    if not found:
        base, suffix = _split_name(out)
        raise FileNotFoundError(f"no shard files {base}.shard-*-of-*{suffix} next to {out}")
    if len(counts) > 1:
        raise ValueError(f"{out}: shard files of different shard counts {sorted(counts)}; name them explicitly")
    count = counts.pop()
    missing = [str(shard_output(out, (i, count))) for i in range(count) if (i, count) not in found]
    if missing:
        raise FileNotFoundError(f"missing shard outputs: {missing}")
    return [found[(i, count)] for i in range(count)]
