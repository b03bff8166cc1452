"""WebDataset shards: write any dataset we read into tar shards, and read them back for training.

Layout (video2dataset's): each sample is three tar members sharing a key, ``<key>.mp4`` (the video
bytes as they were, or re-encoded to a short side), ``<key>.txt`` (the first human caption) and
``<key>.json`` (our caption pool: ``{"id", "captions": [{"text", "source", "noise"}], "meta",
"source_video"}``). Next to the shards, ``manifest.json`` lists every shard with its sample count, size
and sha256, the totals and the arguments of the run, and ``index.jsonl`` holds one line per sample
(``key``, ``shard``, ``id``, ``captions``, ``meta``), which is what a run reads at start-up: the
tokenizer is built from the training captions and every batch's captions are known without opening a
shard, so the shards are read only for the video bytes.

Training from shards (``data.format: webdataset``) keeps the batches a pure function of the step.
The order of an epoch is computed from the manifest alone (no bytes read), see :class:`ShardPlan`:

1. the shards are put in a seeded per-epoch order (``data.shuffle_shards``);
2. the concatenated sample sequence is cut into ``world_size`` contiguous ranges of exactly
   ``steps_per_epoch * batch_size / world_size`` samples, ``steps_per_epoch = N // batch_size``, so
   every rank takes the same number of steps however uneven the shards are, every sample of the epoch
   is seen exactly once across ranks, and the last ``N % batch_size`` samples of the epoch's sequence
   are dropped (truncation, like the folder path's drop-last); a rank opens only the shards its range
   covers;
3. each rank's range passes through a seeded shuffle buffer of ``data.shuffle_buffer`` samples
   (simulated on sample indices, so the permutation is known before any byte is read).

:class:`ShardFrames` then fetches the bytes of the samples a batch asks for by reading the rank's
range of shards forward, each shard once per epoch and process, holding only the samples a later step
of this process will ask for: at most ``data.shuffle_buffer`` + the local batch samples at a time.
Resuming at step k, or a data-loading worker that builds every W-th step, reads tar members up to the
wanted ones without decoding their videos (W workers each read the rank's range once per epoch).
Decoding and frame sampling are the folder path's (:func:`mama.data.clips.decode_clip` on the same
frame indices), so a video gives the same frames from a shard as from its file. A sample whose bytes
fail to decode (or whose members are missing or corrupt) is skipped and replaced like a broken file in
the folder path, with a warning, and counted.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import tarfile
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mama.data.clips import ClipSet, build_clipset, decode_clip, seeded_generator
from mama.data.datasets import VIDEO_EXTENSIONS, read_dataset
from mama.data.records import Caption, VideoRecord
from mama.data.sampling import uniform_indices
from mama.data.video import VideoDecodeError, decode_frames, probe_video, write_video
from mama.fileio import atomic_path, sha256_file

__all__ = [
    "INDEX_NAME",
    "MANIFEST_NAME",
    "ShardError",
    "ShardFrames",
    "ShardPlan",
    "ShardSample",
    "decode_sample_clip",
    "expand_urls",
    "iter_shard_samples",
    "iter_tar_samples",
    "load_shard_clipset",
    "read_manifest",
    "read_source_records",
    "shard_dataset",
    "write_shards",
]

MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.jsonl"
FRAMES_KEY = "_shard_num_frames"  # a shard record's probed frame count, in VideoRecord.meta
_PROGRESS_NAME = ".shard_progress.json"  # finished shards of an interrupted run, rewritten after each shard
MANIFEST_VERSION = 1
# The video member's extensions a reader accepts (video2dataset writes mp4; others keep their container).
_VIDEO_EXTS = tuple(e.lstrip(".") for e in VIDEO_EXTENSIONS)


class ShardError(ValueError):
    """A bad shard folder, manifest, URL or tar stream; the message names the file or URL."""


@dataclass(frozen=True)
class ShardSample:
    """One sample of a shard: ``video`` bytes (b"" when the member is missing), ``meta`` the parsed
    ``<key>.json`` ({} when missing), ``error`` what is wrong with it (None when intact)."""

    key: str
    video: bytes
    meta: dict[str, Any]
    url: str
    video_ext: str = "mp4"
    text: str = ""
    error: str | None = None


# --- writing -----------------------------------------------------------------------------------------


def read_source_records(format: str, source: str | os.PathLike[str], videos: str | None = None) -> list[VideoRecord]:
    """The records to shard: ``format`` a reader of :mod:`mama.data.datasets` on the annotation file
    ``source``, or ``"folder"``: every video file under the folder ``source`` (id = file stem, no captions)."""
    if format != "folder":
        return read_dataset(format, source, videos)
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder of videos")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
    if not files:
        raise ShardError(f"{root}: no video files ({', '.join(VIDEO_EXTENSIONS[:4])}, ...) found")
    return [VideoRecord(id=p.relative_to(root).with_suffix("").as_posix(), video=p, captions=[]) for p in files]


def _sample_json(record: VideoRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "captions": [c.to_dict() for c in record.captions],
        "meta": record.meta,
        "source_video": record.video.name,
    }


def _first_caption(record: VideoRecord) -> str:
    human = [c.text for c in record.captions if c.source == "human"]
    return (human or [c.text for c in record.captions] or [""])[0]


def _video_bytes(record: VideoRecord, short_side: int) -> tuple[bytes, str]:
    """The video's bytes and container extension: as stored, or re-encoded (H.264 mp4) so its shorter
    side is ``short_side`` pixels (rounded down to even, as yuv420p needs)."""
    path = record.video
    if not path.is_file():
        raise VideoDecodeError(f"{path}: video file not found")
    if short_side <= 0:
        return path.read_bytes(), path.suffix.lower().lstrip(".") or "mp4"
    info = probe_video(path)
    frames = decode_frames(path, short_side=short_side)  # (T, H, W, 3) uint8
    frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]  # even H, W for yuv420p
    with tempfile.TemporaryDirectory() as tmp:
        out = write_video(Path(tmp) / "clip.mp4", frames.numpy(), fps=info.fps or 25.0)
        return out.read_bytes(), "mp4"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed: the same samples give the same bytes
    tar.addfile(info, io.BytesIO(data))


def _write_atomic_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")


def _fingerprint(records: Sequence[VideoRecord], args: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one: the arguments and the samples, in order."""
    digest = hashlib.blake2b(digest_size=16)
    for r in records:
        digest.update(json.dumps([r.id, str(r.video), [c.to_dict() for c in r.captions], r.meta]).encode())
    return {**args, "num_records": len(records), "records_digest": digest.hexdigest()}


def _resume_state(out_dir: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The finished shards of an earlier run with the same arguments (those that still verify)."""
    progress = out_dir / _PROGRESS_NAME
    manifest = out_dir / MANIFEST_NAME
    state_file = progress if progress.exists() else manifest if manifest.exists() else None
    if state_file is None:
        if out_dir.exists() and any(out_dir.glob("*.tar")):
            raise ShardError(f"{out_dir}: holds tar files not written by `mama shard`; choose another --out")
        return {"fingerprint": fingerprint, "shards": [], "skipped": []}
    state = json.loads(state_file.read_text())
    if state.get("fingerprint") != fingerprint:
        old = state.get("fingerprint", {})
        diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        raise ShardError(
            f"{out_dir}: holds shards written with different arguments or data (differs in: {', '.join(diff)}); "
            "re-run with the same arguments to resume, or choose another --out"
        )
    kept = []
    for shard in state["shards"]:
        path = out_dir / shard["name"]
        if not path.is_file() or path.stat().st_size != shard["bytes"] or sha256_file(path) != shard["sha256"]:
            warnings.warn(f"{path}: missing or changed since it was written; rewriting it and the rest", stacklevel=3)
            break
        kept.append(shard)
    skipped = [s for s in state.get("skipped", []) if kept and s["index"] < kept[-1]["stop"]]
    return {"fingerprint": fingerprint, "shards": kept, "skipped": skipped}


def write_shards(
    records: Sequence[VideoRecord],
    out_dir: str | os.PathLike[str],
    shard_size_mb: float = 256.0,
    short_side: int = 0,
    args: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``records`` into ``out_dir/shard-NNNNNN.tar`` of about ``shard_size_mb`` MiB each.

    Resumable: every finished shard is recorded (with its sha256) in a progress file written
    atomically; a re-run with the same arguments and records keeps the shards that still verify and
    writes the rest. Different arguments or records raise :class:`ShardError`. A video that cannot be
    read (or re-encoded) is skipped with a warning and listed under ``skipped`` in the manifest.

    Args:
        records: the samples, in the order they are written; sample keys are their positions.
        short_side: 0 stores the files' bytes; N re-encodes every video to an N-pixel shorter side.
        args: the source description recorded in the manifest (format, annotation file, ...).

    Returns:
        The manifest (also written to ``out_dir/manifest.json``, with ``index.jsonl`` beside it).
    """
    out = Path(out_dir)
    if shard_size_mb <= 0:
        raise ValueError(f"shard_size_mb must be positive, got {shard_size_mb}")
    target = int(shard_size_mb * 2**20)
    full_args = {**(args or {}), "shard_size_mb": shard_size_mb, "short_side": short_side}
    state = _resume_state(out, _fingerprint(records, full_args))
    out.mkdir(parents=True, exist_ok=True)
    start = state["shards"][-1]["stop"] if state["shards"] else 0
    bar = tqdm(total=len(records), initial=start, desc="shard", unit="video", disable=not progress)
    i = start
    while i < len(records):
        name = f"shard-{len(state['shards']):06d}.tar"
        first, size = i, 0
        keys: list[str] = []
        frame_counts: list[int] = []
        with atomic_path(out / name) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            while i < len(records) and (size < target or not keys):
                record, key = records[i], f"{i:09d}"
                i += 1
                bar.update(1)
                try:
                    video, ext = _video_bytes(record, short_side)
                    with _as_file(video, ext) as path:  # probed now, so training need not probe every sample
                        num_frames = probe_video(path).num_frames
                    if num_frames <= 0:
                        raise VideoDecodeError(f"{record.video}: no frames")
                except (VideoDecodeError, OSError) as exc:
                    warnings.warn(f"skipping video {exc}", stacklevel=2)
                    state["skipped"].append({"index": i - 1, "id": record.id, "error": str(exc)})
                    continue
                members = [
                    (f"{key}.{ext}", video),
                    (f"{key}.txt", _first_caption(record).encode()),
                    (f"{key}.json", json.dumps({**_sample_json(record), "num_frames": num_frames}).encode()),
                ]
                for member, data in members:
                    _add_member(tar, member, data)
                    size += 512 + -(-len(data) // 512) * 512  # header + padded data
                keys.append(key)
                frame_counts.append(num_frames)
        if not keys:  # only unreadable videos at the end: no empty shard
            (out / name).unlink()
            break
        state["shards"].append(
            {"name": name, "samples": len(keys), "bytes": (out / name).stat().st_size,
             "sha256": sha256_file(out / name), "start": first, "stop": i, "keys": keys,
             "num_frames": frame_counts}
        )  # fmt: skip
        _write_atomic_json(out / _PROGRESS_NAME, state)
    bar.close()
    return _finish(out, records, state)


def _finish(out: Path, records: Sequence[VideoRecord], state: dict[str, Any]) -> dict[str, Any]:
    """Write the index and the manifest (atomically, the manifest last) and drop the progress file."""
    index_lines = []
    for shard in state["shards"]:
        for key, num_frames in zip(shard["keys"], shard["num_frames"], strict=True):
            record = records[int(key)]
            line = {"key": key, "shard": shard["name"], **_sample_json(record), "num_frames": num_frames}
            index_lines.append(json.dumps(line) + "\n")
    with atomic_path(out / INDEX_NAME) as tmp:
        tmp.write_text("".join(index_lines))
    manifest = {
        "format": "mama-webdataset",
        "version": MANIFEST_VERSION,
        "fingerprint": state["fingerprint"],
        "args": {k: v for k, v in state["fingerprint"].items() if k not in ("num_records", "records_digest")},
        "shards": state["shards"],
        "total_samples": sum(s["samples"] for s in state["shards"]),
        "total_bytes": sum(s["bytes"] for s in state["shards"]),
        "skipped": state["skipped"],
        "index": INDEX_NAME,
    }
    _write_atomic_json(out / MANIFEST_NAME, manifest)
    (out / _PROGRESS_NAME).unlink(missing_ok=True)
    return manifest


def shard_dataset(
    format: str,
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    videos: str | None = None,
    shard_size_mb: float = 256.0,
    short_side: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """``mama shard``: read ``source`` with ``format`` (a dataset reader or ``"folder"``) and write its
    shards (:func:`write_shards`)."""
    records = read_source_records(format, source, videos)
    args = {"format": format, "source": str(Path(source).resolve()), "videos": videos or ""}
    return write_shards(records, out_dir, shard_size_mb, short_side, args, progress)


# --- reading -----------------------------------------------------------------------------------------


def expand_urls(pattern: str | Sequence[str]) -> list[str]:
    """Shard URLs of a brace pattern (``shards/shard-{000000..000009}.tar``; several patterns joined
    by ``::``), a list of them, local paths, ``http(s)://`` URLs or ``pipe:`` commands."""
    from webdataset.shardlists import expand_urls as wds_expand

    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    urls = [u for p in patterns for u in wds_expand(p)]
    if not urls:
        raise ShardError(f"no shard URL in {pattern!r}")
    return urls


def open_url(url: str) -> IO[bytes]:
    """A binary stream of ``url``: a local path (or ``file:``), ``http(s)://`` (through curl, like
    webdataset) or ``pipe:COMMAND`` (its stdout)."""
    from webdataset import gopen

    if url.startswith(("http://", "https://", "pipe:")):
        try:
            return gopen(url, "rb")
        except Exception as exc:
            raise ShardError(f"{url}: cannot open: {exc}") from exc
    path = url.removeprefix("file:")
    try:
        return open(path, "rb")
    except OSError as exc:
        raise ShardError(f"{path}: cannot open shard: {exc}") from exc


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's key rule: the key is the path up to the first dot of its last component."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _make_sample(url: str, key: str, members: dict[str, bytes]) -> ShardSample:
    video_ext = next((e for e in members if e in _VIDEO_EXTS), None)
    errors = []
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            parsed = json.loads(members["json"])
            if not isinstance(parsed, dict):
                raise ValueError(f"expected an object, got {type(parsed).__name__}")
            meta = parsed
        except (ValueError, UnicodeDecodeError) as exc:
            errors.append(f"{key}.json is not valid JSON ({exc})")
    if video_ext is None:
        errors.append(f"{key} has no video member (members: {sorted(members)})")
    text = members.get("txt", b"").decode("utf-8", errors="replace")
    return ShardSample(
        key, members.get(video_ext or "", b""), meta, url, video_ext or "mp4", text, "; ".join(errors) or None
    )


def iter_tar_samples(url: str) -> Iterator[ShardSample]:
    """The samples of one shard, in member order, streamed (nothing decoded; members of one key must
    be consecutive, as webdataset writes them).

    Raises:
        ShardError: the stream cannot be opened or is not a readable tar (truncated, corrupt), naming
            ``url`` and the last good key.
    """
    stream = open_url(url)
    key, members, last = None, {}, None
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                name_key, ext = _split_name(info.name)
                if key is not None and name_key != key:
                    yield _make_sample(url, key, members)
                    last, members = key, {}
                key = name_key
                handle = tar.extractfile(info)
                members[ext] = handle.read() if handle is not None else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ShardError(f"{url}: unreadable tar stream after sample {last!r}: {exc}") from exc
    finally:
        _close_quietly(stream)
    if key is not None:
        yield _make_sample(url, key, members)


def _close_quietly(stream: IO[bytes]) -> None:
    # Closing a pipe or curl before its end kills the producer with SIGPIPE, which webdataset reports as
    # an error; stopping early is what a reader that found its samples does.
    with contextlib.suppress(Exception):  # nothing to recover from a producer we no longer read
        stream.close()


def iter_shard_samples(
    urls: str | Sequence[str], rank: int = 0, world_size: int = 1, strict: bool = False
) -> Iterator[ShardSample]:
    """Every sample of the shards ``urls`` (a brace pattern or a list) that belong to ``rank``: shard
    ``i`` goes to rank ``i % world_size``, in shard order. A shard that cannot be read is skipped with a
    warning (``strict``: raised); samples with an ``error`` are yielded for the caller to count."""
    for i, url in enumerate(expand_urls(urls)):
        if i % world_size != rank:
            continue
        try:
            yield from iter_tar_samples(url)
        except ShardError as exc:
            if strict:
                raise
            warnings.warn(f"skipping the rest of shard {exc}", stacklevel=2)


@contextmanager
def _as_file(video: bytes, ext: str) -> Iterator[Path]:
    """``video`` bytes as a temporary file (in memory-backed /dev/shm where there is one), so the
    folder path's decoder, with its keyframe seeking by packet timestamps, reads them unchanged."""
    folder = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    fd, name = tempfile.mkstemp(suffix=f".{ext}", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(video)
        yield Path(name)
    finally:
        os.unlink(name)


def decode_sample_clip(
    sample: ShardSample, num_slots: int, slots: Sequence[int] | Tensor, frame_size: int, num_frames: int | None = None
) -> tuple[Tensor, int]:
    """Frames of a shard sample exactly as :class:`mama.data.clips.StreamedFrames` decodes its file:
    ``slots`` of ``num_slots`` uniformly spaced sampling slots over the video's ``num_frames`` (probed
    from the bytes when None), shorter side resized to ``frame_size`` and centre-cropped.

    Returns:
        uint8 (T, S, S, 3) with T = len(slots), and the frame count used.

    Raises:
        VideoDecodeError: the sample is damaged or its bytes do not decode (the message names it).
    """
    name = f"{sample.url}/{sample.key}.{sample.video_ext}"
    if sample.error is not None:
        raise VideoDecodeError(f"{name}: {sample.error}")
    slots = torch.as_tensor(slots, dtype=torch.long)
    try:
        with _as_file(sample.video, sample.video_ext) as path:
            if num_frames is None:
                num_frames = probe_video(path).num_frames
            if num_frames <= 0:
                raise VideoDecodeError(f"{path}: no frames")
            try:
                frames = decode_clip(path, uniform_indices(num_frames, num_slots)[slots].tolist(), frame_size)
            except VideoDecodeError:
                # Headers can overstate the decodable frames: count once and retry (as StreamedFrames does).
                exact = probe_video(path, exact=True).num_frames
                if not 0 < exact < num_frames:
                    raise
                num_frames = exact
                frames = decode_clip(path, uniform_indices(num_frames, num_slots)[slots].tolist(), frame_size)
    except VideoDecodeError as exc:
        # The temporary file's name means nothing to the user: name the shard member instead.
        raise VideoDecodeError(str(exc).replace(str(path), name) if "path" in locals() else f"{name}: {exc}") from None
    return frames, num_frames


# --- training ------------------------------------------------------------------------------------


def read_manifest(location: str) -> dict[str, Any]:
    """The manifest at a local path or ``http(s)://`` URL (read through :func:`open_url`)."""
    stream = open_url(location)
    try:
        data = stream.read()
    finally:
        _close_quietly(stream)
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise ShardError(f"{location}: not a shard manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "mama-webdataset":
        raise ShardError(f"{location}: not a manifest written by `mama shard`")
    return manifest


def _sibling(url: str, name: str) -> str:
    if url.startswith("pipe:"):
        raise ShardError(f"cannot find {name} next to {url!r}: set data.manifest to its path or URL")
    return url.removeprefix("file:").rsplit("/", 1)[0] + "/" + name if "/" in url else name


@dataclass
class ShardPlan:
    """The sample order of every epoch, from the manifest alone (module docstring, steps 1-3).

    Attributes:
        shard_videos: per shard, the clip-set indices of its samples in member order.
        batch_size: the global batch B; ``world_size`` ranks take B / world_size rows each.
    """

    shard_videos: list[list[int]]
    batch_size: int
    world_size: int
    seed: int
    shuffle_shards: bool = True
    shuffle_buffer: int = 0
    _cached: tuple[int, Tensor] | None = field(default=None, repr=False)
    _position: Tensor | None = field(default=None, repr=False)

    @property
    def num_samples(self) -> int:
        return sum(len(s) for s in self.shard_videos)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def rank_range(self, epoch: int, rank: int) -> list[int]:
        """Clip-set indices of rank ``rank``'s range of ``epoch`` in stream order (shard order, member
        order), before the shuffle buffer (steps 1-2)."""
        shards = list(range(len(self.shard_videos)))
        if self.shuffle_shards:
            shards = torch.randperm(len(shards), generator=seeded_generator(self.seed, 5, epoch)).tolist()
        sequence = [v for s in shards for v in self.shard_videos[s]]
        per_rank = self.steps_per_epoch * (self.batch_size // self.world_size)
        return sequence[rank * per_rank : (rank + 1) * per_rank]

    def rank_order(self, epoch: int, rank: int) -> list[int]:
        """Clip-set indices rank ``rank`` reads in ``epoch``, in order (steps_per_epoch x B / world)."""
        return _shuffle_buffer(
            self.rank_range(epoch, rank), self.shuffle_buffer, seeded_generator(self.seed, 6, epoch, rank)
        )

    def __call__(self, epoch: int) -> Tensor:
        """(steps_per_epoch * B,) clip indices: global batch p is rows ``p*B:(p+1)*B``, and its rank-r
        rows (``shard_range(B, r, world)``) are rank r's p-th local batch."""
        if self._cached is None or self._cached[0] != epoch:
            local = self.batch_size // self.world_size
            ranks = [torch.tensor(self.rank_order(epoch, r)).view(-1, local) for r in range(self.world_size)]
            self._cached = (epoch, torch.stack(ranks, 1).reshape(-1))  # (steps, world, local) -> (steps*B,)
            self._position = None
        return self._cached[1]

    def locate(self, videos: Sequence[int]) -> tuple[int, int, int] | None:
        """``(epoch, rank, step)`` when ``videos`` are, in order, rank ``rank``'s local batch of ``step``
        (counted within the epoch) in the epoch last ordered by a call; else None."""
        if self._cached is None or not videos:
            return None
        epoch, order = self._cached
        if self._position is None:  # clip index -> its position in the epoch's order, -1 when not in it
            self._position = torch.full((self.num_samples,), -1, dtype=torch.long)
            self._position[order] = torch.arange(len(order))
        first = int(self._position[videos[0]]) if 0 <= videos[0] < self.num_samples else -1
        local = self.batch_size // self.world_size
        if first < 0 or first % local or len(videos) != local:
            return None
        if order[first : first + local].tolist() != list(videos):
            return None
        step, row = divmod(first, self.batch_size)
        return epoch, row // local, step


def _shuffle_buffer(items: list[int], size: int, generator: torch.Generator) -> list[int]:
    """webdataset's shuffle buffer on indices: fill ``size`` items, then emit a random one per new item."""
    if size <= 1:
        return list(items)
    buffer: list[int] = []
    out = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            j = int(torch.randint(len(buffer), (1,), generator=generator))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            out.append(buffer.pop())
    while buffer:
        j = int(torch.randint(len(buffer), (1,), generator=generator))
        buffer[j], buffer[-1] = buffer[-1], buffer[j]
        out.append(buffer.pop())
    return out


def _worker_stride() -> int:
    """Steps between two batches this process builds: :func:`mama.data.clips.map_in_workers` hands a
    DataLoader's W workers the steps in turn, so a worker builds every W-th step; the loop's process
    every step. Only a guess of what to hold: :class:`ShardFrames` stays correct when it is wrong."""
    info = torch.utils.data.get_worker_info()
    return info.num_workers if info is not None else 1


@dataclass
class _Pass:
    """One forward read of a rank's range in an epoch, for the requests of one process.

    ``inputs`` is the range in stream order (shard order, member order); the process asks at local steps
    ``phase, phase + stride, ...`` (from ``step`` on) for the rows of ``step_of``. While reading, a sample
    is held only when one of those later requests wants it, and dropped when served.
    """

    epoch: int
    rank: int
    inputs: list[int]
    input_of: dict[int, int]
    step_of: dict[int, int]
    stride: int
    phase: int
    step: int
    next_input: int = 0
    held: dict[int, ShardSample | str] = field(default_factory=dict)  # video -> sample, or why it is unreadable
    reader: Iterator[ShardSample] | None = None
    reader_url: str = ""
    reader_at: int = 0  # members the reader has yielded
    reader_error: str | None = None  # the shard's stream broke: every later member fails with this

    def wanted(self, video: int) -> bool:
        step = self.step_of[video]
        return step >= self.step and (step - self.phase) % self.stride == 0

    def close(self) -> None:
        if self.reader is not None:
            _close_reader(self.reader)
            self.reader = None


class ShardFrames:
    """A frame source (like :class:`mama.data.clips.StreamedFrames`) over shard samples.

    Every clip-set video is ``(shard url, member position, key)``. With a ``plan`` (the epoch order of
    training), a request for a rank's local batch of a step reads the rank's range of shards forward,
    each shard once per epoch, and holds exactly the samples this process will ask for later (the steps
    it builds: every one, or every W-th in a data-loading worker of W), dropping each once served. The
    shuffle buffer's output at position i comes from input positions up to i + shuffle_buffer - 1, so
    at most ``shuffle_buffer + local batch`` samples are held at any time (``held_peak``), whatever the
    steps asked. A request the plan does not predict (a substitute for a failed sample, a resumed
    or re-ordered step, no plan) is still served right: from what is held, or by reading the shards
    that hold it from their start (one read per shard per request; the forward read restarts when a
    planned sample was passed without being held).
    """

    def __init__(
        self, locations: list[tuple[str, int, str]], num_slots: int, frame_size: int, plan: ShardPlan | None = None
    ) -> None:
        self.locations, self.num_slots, self.frame_size, self.plan = locations, num_slots, frame_size, plan
        self.lengths: dict[int, int] = {}  # probed frame counts
        self._pass: _Pass | None = None
        self._stride: int | None = None  # this process's steps between batches; known in the process itself
        # What reading cost (tests and benchmarks check them): tar samples read, shard streams opened, most
        # samples held at once.
        self.members_read = self.shards_opened = self.held_peak = 0
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        # Open streams, held bytes and the counts of reading stay in the process that read; a worker reads
        # on its own.
        state = dict(self.__dict__)
        state["_pass"], state["_stride"] = None, None
        state["members_read"] = state["shards_opened"] = state["held_peak"] = 0
        return state

    def _this_process(self) -> None:
        # A forked data-loading worker inherits the parent's streams, whose file offsets (or pipe) it would
        # share: it starts its own reading instead.
        if self._pid != os.getpid():
            self._pid, self._pass, self._stride = os.getpid(), None, None
            self.members_read = self.shards_opened = self.held_peak = 0

    def clips(self, video_index: Tensor, slot_index: Tensor) -> tuple[Tensor, list[tuple[int, str]]]:
        """video_index (B,), slot_index (B, T) -> uint8 (B, T, S, S, 3) and the failed ``(row, error)``s."""
        out = torch.zeros(*slot_index.shape, self.frame_size, self.frame_size, 3, dtype=torch.uint8)
        videos = video_index.tolist()
        self._this_process()
        samples = self._planned(videos) or self._read(videos)
        failed = []
        for row, (video, slots) in enumerate(zip(videos, slot_index, strict=True)):
            try:
                sample = samples[video]
                if isinstance(sample, str):
                    raise VideoDecodeError(sample)
                out[row], self.lengths[video] = decode_sample_clip(
                    sample, self.num_slots, slots, self.frame_size, self.lengths.get(video)
                )
            except VideoDecodeError as exc:
                failed.append((row, str(exc)))
        return out, failed

    def fetch(self, video: int) -> ShardSample:
        """The sample of clip-set video ``video`` (a damaged one carries its ``error``).

        Raises:
            VideoDecodeError: its shard cannot be read up to it, or holds another sample there.
        """
        self._this_process()
        sample = self._read([video])[video]
        if isinstance(sample, str):
            raise VideoDecodeError(sample)
        return sample

    def select(self, rows: Tensor) -> ShardFrames:
        picked = rows.tolist()
        frames = ShardFrames([self.locations[i] for i in picked], self.num_slots, self.frame_size, self.plan)
        frames.lengths = {new: self.lengths[old] for new, old in enumerate(picked) if old in self.lengths}
        return frames

    # --- planned requests: one forward read per epoch ---

    def _planned(self, videos: list[int]) -> dict[int, ShardSample | str] | None:
        """The samples of ``videos`` when they are a rank's local batch of a step of the plan, else None."""
        where = self.plan.locate(videos) if self.plan is not None else None
        if where is None:
            return None
        epoch, rank, step = where
        if self._stride is None:
            self._stride = _worker_stride()
        run = self._pass
        if run is not None and (run.epoch, run.rank) == (epoch, rank) and step > run.step:
            if (step - run.phase) % run.stride:  # steps come at another stride than guessed: hold for both
                run.stride = self._stride = math.gcd(run.stride, step - run.step)
            run.step = step
            for video in [v for v in run.held if run.step_of[v] < step]:  # asked by steps that were skipped
                del run.held[video]
            if any(v not in run.held and run.input_of[v] < run.next_input for v in videos):
                run = self._start_pass(epoch, rank, step)  # passed without being held: read again from the start
        else:
            run = self._start_pass(epoch, rank, step)
        self._read_forward(run, max(run.input_of[v] for v in videos))
        return {v: run.held.pop(v) for v in videos}

    def _start_pass(self, epoch: int, rank: int, step: int) -> _Pass:
        assert self.plan is not None and self._stride is not None
        if self._pass is not None:
            self._pass.close()
        inputs = self.plan.rank_range(epoch, rank)
        local = self.plan.batch_size // self.plan.world_size
        world = self.plan.world_size
        order = self.plan(epoch).view(-1, world, local)[:, rank].reshape(-1).tolist()  # rank_order, cached
        self._pass = _Pass(
            epoch, rank, inputs, {v: i for i, v in enumerate(inputs)}, {v: i // local for i, v in enumerate(order)},
            self._stride, step % self._stride, step,
        )  # fmt: skip
        return self._pass

    def _read_forward(self, run: _Pass, last: int) -> None:
        """Read ``run``'s inputs up to position ``last``, holding the wanted ones."""
        while run.next_input <= last:
            video = run.inputs[run.next_input]
            url, position, _ = self.locations[video]
            if run.reader is None or run.reader_url != url or run.reader_at > position:
                run.close()
                run.reader, run.reader_url, run.reader_at, run.reader_error = self._open(url), url, 0, None
            sample = self._advance(run, video)
            if run.wanted(video):
                run.held[video] = sample
                self.held_peak = max(self.held_peak, len(run.held))
            run.next_input += 1
        if run.next_input == len(run.inputs):
            run.close()

    def _advance(self, run: _Pass, video: int) -> ShardSample | str:
        """Move ``run``'s reader to ``video``'s member: its sample, or why it cannot be read."""
        assert run.reader is not None
        url, position, key = self.locations[video]
        if run.reader_error is not None:
            return run.reader_error
        sample = None
        try:
            while run.reader_at <= position:
                sample = next(run.reader)
                run.reader_at += 1
                self.members_read += 1
        except StopIteration:
            run.reader_error = f"{url}: shard ended before sample {key} (member {position})"
            return run.reader_error
        except ShardError as exc:
            run.reader_error = str(exc)
            return run.reader_error
        assert sample is not None
        return _checked(sample, url, position, key)

    # --- other requests ---

    def _read(self, videos: list[int]) -> dict[int, ShardSample | str]:
        """Samples of ``videos`` from what the forward read holds, else by reading their shards from the
        start (each once, up to the last one wanted); nothing read here is held."""
        run = self._pass
        found: dict[int, ShardSample | str] = {}
        wanted: dict[str, dict[int, list[int]]] = {}  # url -> member position -> videos
        for video in videos:
            if run is not None and video in run.held:
                found[video] = run.held[video]  # a later planned request still takes it
            else:
                url, position, _ = self.locations[video]
                wanted.setdefault(url, {}).setdefault(position, []).append(video)
        for url, positions in wanted.items():
            samples = self._open(url)
            at, error = 0, None
            try:
                for position in sorted(positions):
                    key = self.locations[positions[position][0]][2]
                    result: ShardSample | str
                    if error is None:
                        try:
                            while at <= position:
                                sample = next(samples)
                                at += 1
                                self.members_read += 1
                            result = _checked(sample, url, position, key)
                        except StopIteration:
                            error = result = f"{url}: shard ended before sample {key} (member {position})"
                        except ShardError as exc:
                            error = result = str(exc)
                    else:
                        result = error
                    for video in positions[position]:
                        found[video] = result
            finally:
                _close_reader(samples)
        return found

    def _open(self, url: str) -> Iterator[ShardSample]:
        self.shards_opened += 1
        return iter_tar_samples(url)


def _close_reader(samples: Iterator[ShardSample]) -> None:
    close = getattr(samples, "close", None)  # a generator of iter_tar_samples: closes its stream
    if close is not None:
        close()


def _checked(sample: ShardSample, url: str, position: int, key: str) -> ShardSample | str:
    """``sample`` when it is the manifest's sample ``key`` at member ``position``, else why not."""
    if sample.key != key:
        return f"{url}: member {position} is sample {sample.key}, the manifest says {key}"
    return sample


def _read_index(location: str) -> list[dict[str, Any]]:
    stream = open_url(location)
    try:
        text = stream.read().decode("utf-8")
    finally:
        _close_quietly(stream)
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as exc:
        raise ShardError(f"{location}: bad index line ({exc})") from None


def _index_records(rows: list[dict[str, Any]], location: str) -> list[VideoRecord]:
    records = []
    for row in rows:
        try:
            captions = [Caption(**c) for c in row["captions"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardError(f"{location}: sample {row.get('key')!r}: bad captions ({exc})") from None
        # The "video" of a shard sample names its member, for messages.
        # The "video" of a shard sample names its member, for messages; the frame count travels in meta.
        meta = {**row.get("meta", {}), FRAMES_KEY: row.get("num_frames")}
        records.append(VideoRecord(row["id"], Path(row["shard"]) / f"{row['key']}", captions, meta))
    return records


def shard_records(urls: str, manifest_location: str = "") -> tuple[dict[str, Any], list[str], list[VideoRecord]]:
    """The manifest, one URL per manifest shard, and the records of every sample (from the index).

    ``urls`` must expand to the manifest's shards in order (checked by file name where the URL has one).
    """
    shard_urls = expand_urls(urls)
    manifest_location = manifest_location or _sibling(shard_urls[0], MANIFEST_NAME)
    manifest = read_manifest(manifest_location)
    names = [s["name"] for s in manifest["shards"]]
    if len(shard_urls) != len(names):
        raise ShardError(
            f"data.urls gives {len(shard_urls)} shards, {manifest_location} lists {len(names)}: "
            "train on the whole manifest (its brace pattern)"
        )
    for url, name in zip(shard_urls, names, strict=True):
        if not url.startswith("pipe:") and url.rsplit("/", 1)[-1] != name:
            raise ShardError(f"data.urls: {url} is not {name}, the manifest's shard at that position")
    index_location = (
        manifest_location.rsplit("/", 1)[0] + "/" + manifest["index"] if "/" in manifest_location else manifest["index"]
    )
    return manifest, shard_urls, _index_records(_read_index(index_location), index_location)


def load_shard_clipset(
    records: list[VideoRecord],
    shard_urls: list[str],
    manifest: dict[str, Any],
    tokenize: Callable[[list[str]], tuple[Tensor, Tensor]],
    frame_size: int,
    num_slots: int,
    plan_args: dict[str, Any],
    caption_sources: Sequence[str] = ("human", "lvlm"),
    pixel_mean: Sequence[float] = (0.5, 0.5, 0.5),
    pixel_std: Sequence[float] = (0.25, 0.25, 0.25),
) -> ClipSet:
    """The training clip set of shards: ``records`` from :func:`shard_records` (order of the index),
    frames from :class:`ShardFrames`, epochs ordered by a :class:`ShardPlan` (``plan_args``: its
    batch_size, world_size, seed, shuffle_shards, shuffle_buffer)."""
    url_of = {s["name"]: url for s, url in zip(manifest["shards"], shard_urls, strict=True)}
    positions: dict[str, int] = {}
    locations = []
    for record in records:
        shard = record.video.parent.name
        locations.append((url_of[shard], positions.get(shard, 0), record.video.name))
        positions[shard] = positions.get(shard, 0) + 1
    source = ShardFrames(locations, num_slots, frame_size)
    source.lengths = {i: r.meta[FRAMES_KEY] for i, r in enumerate(records) if r.meta.get(FRAMES_KEY)}
    clips = build_clipset("train", records, source, tokenize, caption_sources, [], pixel_mean, pixel_std)
    # Videos with no caption of the chosen sources left the set: plan over the kept ones.
    kept_of = {id(r): i for i, r in enumerate(clips.records)}
    shard_videos: dict[str, list[int]] = {s["name"]: [] for s in manifest["shards"]}
    for record in records:
        if id(record) in kept_of:
            shard_videos[record.video.parent.name].append(kept_of[id(record)])
    plan = ShardPlan(list(shard_videos.values()), **plan_args)
    if plan.steps_per_epoch == 0:
        raise ShardError(f"batch size {plan.batch_size} exceeds the {plan.num_samples} samples of the shards")
    clips.epoch_order = plan
    cast(ShardFrames, clips.source).plan = plan  # reads each epoch's shards in the order the plan asks
    return clips
