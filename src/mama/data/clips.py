"""Clip sets: one split's videos and tokenised caption pools, sampled deterministically.

Frames come from a frame source. Small datasets (SynthVL, a few thousand short clips) are decoded once at
reduced resolution into a safetensors cache next to the annotations (:class:`CachedFrames`), so three
training variants in one demo decode nothing twice. Real benchmarks at 224 px do not fit in memory and
are decoded batch by batch from the files (:class:`StreamedFrames`), optionally in worker processes.

Either way a video offers ``F`` sampling slots spread uniformly over its length; training draws one
slot per segment, evaluation takes the segment centres. Every batch is a pure function of ``(seed,
step)``: resuming at step k replays exactly the batches an uninterrupted run would have seen, with no
sampler state to save.

A video that fails to decode in the middle of a run is never fatal: training replaces it (with its
caption) by the next good video and reports it; evaluation keeps it with blank frames, so it still
counts (as a miss, most likely) instead of silently leaving the test set.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from mama.data.records import VideoRecord
from mama.data.sampling import segment_random_indices, uniform_indices
from mama.data.transforms import center_crop, normalize
from mama.data.video import VideoDecodeError, decode_frames, probe_video
from mama.fileio import atomic_path

# Default normalisation (the from-scratch models); pretrained backbones bring their own mean and std.
PIXEL_MEAN = (0.5, 0.5, 0.5)
PIXEL_STD = (0.25, 0.25, 0.25)
CACHE_VERSION = 2
# A training row whose video fails is replaced by another video; give up after this many rounds of failed
# replacements (random picks: only a mostly broken dataset gets there).
MAX_SUBSTITUTIONS = 32


def frames_to_model_input(
    frames: Tensor, mean: Sequence[float] = PIXEL_MEAN, std: Sequence[float] = PIXEL_STD
) -> Tensor:
    """uint8 (B, T, H, W, 3) -> float32 (B, T, 3, H, W), normalised per channel."""
    return normalize(frames, mean, std)


def decode_clip(path: Path, indices: Sequence[int], frame_size: int) -> Tensor:
    """Frames ``indices`` of ``path`` as uint8 (T, S, S, 3): shorter side resized to S while decoding
    (aspect kept), then the centre S x S crop (CLIP4Clip's preprocessing, for training and evaluation)."""
    frames = decode_frames(path, indices=indices, short_side=frame_size)
    return center_crop(frames, frame_size)


def seeded_generator(*keys: int) -> torch.Generator:
    # Mix the keys into one 63-bit seed so (seed, step) pairs never collide in practice.
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


@dataclass
class CachedFrames:
    """Frames decoded once and held in memory: uint8 ``(V, F, H, W, 3)``, F slots per video."""

    frames: Tensor

    @property
    def num_slots(self) -> int:
        return self.frames.shape[1]

    def clips(self, video_index: Tensor, slot_index: Tensor) -> tuple[Tensor, list[tuple[int, str]]]:
        """video_index (B,), slot_index (B, T) -> uint8 (B, T, H, W, 3) and no failures."""
        # (V, F, H, W, 3) gathered at (B, T) -> (B, T, H, W, 3)
        return self.frames[video_index[:, None], slot_index], []

    def select(self, rows: Tensor) -> CachedFrames:
        return CachedFrames(self.frames[rows])


@dataclass
class StreamedFrames:
    """Frames decoded from the files for every batch.

    Attributes:
        paths: one video file (or frame folder) per video.
        lengths: frame count of each video (probed when the split was loaded).
        num_slots: F sampling slots per video, spread uniformly over its frames.
        frame_size: S, frames come out S x S (shorter side resized, centre crop).
    """

    paths: list[Path]
    lengths: list[int]
    num_slots: int
    frame_size: int

    def clips(self, video_index: Tensor, slot_index: Tensor) -> tuple[Tensor, list[tuple[int, str]]]:
        """video_index (B,), slot_index (B, T) -> uint8 (B, T, S, S, 3) and the failed ``(row, error)``s,
        whose rows are left blank."""
        out = torch.zeros(*slot_index.shape, self.frame_size, self.frame_size, 3, dtype=torch.uint8)
        failed = []
        for row, (video, slots) in enumerate(zip(video_index.tolist(), slot_index, strict=True)):
            try:
                out[row] = self._decode(video, slots)
            except VideoDecodeError as exc:
                failed.append((row, str(exc)))
        return out, failed

    def _decode(self, video: int, slots: Tensor) -> Tensor:
        frame_index = uniform_indices(self.lengths[video], self.num_slots)[slots]
        try:
            return decode_clip(self.paths[video], frame_index.tolist(), self.frame_size)
        except VideoDecodeError:
            # Container headers can overstate the decodable frames (edit lists, a cut tail): count them
            # once and retry, instead of treating a good video as broken.
            exact = probe_video(self.paths[video], exact=True).num_frames
            if not 0 < exact < self.lengths[video]:
                raise
            self.lengths[video] = exact
            frame_index = uniform_indices(exact, self.num_slots)[slots]
            return decode_clip(self.paths[video], frame_index.tolist(), self.frame_size)

    def select(self, rows: Tensor) -> StreamedFrames:
        keep = rows.tolist()
        return StreamedFrames(
            [self.paths[i] for i in keep], [self.lengths[i] for i in keep], self.num_slots, self.frame_size
        )


class FrameSource(Protocol):
    """Where a clip set's frames come from: :class:`CachedFrames`, :class:`StreamedFrames`, or the
    shard samples of :class:`mama.data.shards.ShardFrames`."""

    @property
    def num_slots(self) -> int: ...

    def clips(self, video_index: Tensor, slot_index: Tensor) -> tuple[Tensor, list[tuple[int, str]]]: ...

    def select(self, rows: Tensor) -> FrameSource: ...


@dataclass
class ClipSet:
    """Videos of one split and their caption pools.

    Attributes:
        records: the kept records (videos that could not be opened are dropped and counted).
        source: where frames come from (in-memory cache or the files), F slots per video.
        caption_ids, caption_mask: (C, L) tokenised captions of all pools, concatenated.
        pool_start, pool_size: (V,) each video's slice of the caption arrays.
        caption_video: (C,) index of each caption's video.
        caption_source, caption_noise, caption_text: per caption, strings.
        skipped: "path: error" of every video that could not be used, at load time or during the run.
        pixel_mean, pixel_std: per-channel normalisation of the model (its registry spec).
    """

    records: list[VideoRecord]
    source: FrameSource
    caption_ids: Tensor
    caption_mask: Tensor
    pool_start: Tensor
    pool_size: Tensor
    caption_video: Tensor
    caption_source: list[str]
    caption_noise: list[str]
    caption_text: list[str]
    skipped: list[str]
    pixel_mean: tuple[float, ...] = PIXEL_MEAN
    pixel_std: tuple[float, ...] = PIXEL_STD
    failed: dict[int, str] = field(default_factory=dict)  # mid-run failures: video index -> "path: error"
    # epoch -> (steps_per_epoch * batch_size,) video order of training (shards: mama.data.shards.ShardPlan);
    # None: a seeded permutation of every video per epoch.
    epoch_order: Callable[[int], Tensor] | None = None
    # Videos that failed in this process; never drawn again as substitutes.
    _bad: set[int] = field(default_factory=set, repr=False)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_slots(self) -> int:
        return self.source.num_slots

    def note_failures(self, failures: dict[int, str]) -> None:
        """Record videos that failed mid-run, possibly in another process (a data-loading worker or
        another rank), once per video: ``{video index: "path: error"}``."""
        for video, message in failures.items():
            if video not in self.failed:
                self.failed[video] = message
                self.skipped.append(message)

    def _fail(self, video: int, error: str) -> None:
        if video in self._bad:
            return
        self._bad.add(video)
        path = str(self.records[video].video)
        message = error if error.startswith(path) else f"{path}: {error}"
        warnings.warn(f"skipping video {message}", stacklevel=3)
        self.note_failures({video: message})

    def batch(
        self,
        video_index: Tensor,
        caption_index: Tensor,
        frame_index: Tensor,
        rows: range | None = None,
        substitute: bool = True,
    ) -> dict[str, Any]:
        """Assemble a batch. video_index (B,), caption_index (B,), frame_index (B, T) slots; ``rows`` keeps
        only those rows (this rank's share), so the others are never decoded.

        Returns uint8 ``frames`` (B, T, H, W, 3) (:meth:`to_model_input` makes the model input; data
        workers ship uint8, 4x less than float), the caption tokens, the indices and ``failed``.
        A row whose video fails to decode is replaced by another good video not in the batch, with
        its caption at the same pool position (``substitute``), or kept with blank frames."""
        if rows is not None:
            video_index, caption_index, frame_index = (
                t[rows.start : rows.stop] for t in (video_index, caption_index, frame_index)
            )
        video_index, caption_index = video_index.clone(), caption_index.clone()
        clips, failed = self.source.clips(video_index, frame_index)
        failures: dict[int, str] = {}
        rounds = 0
        while failed:
            if rounds == MAX_SUBSTITUTIONS:
                raise RuntimeError(
                    f"{self.records[0].video.parent}: {MAX_SUBSTITUTIONS} rounds of replacement videos failed to decode "
                    f"({len(self.failed)} failed so far, e.g. {list(self.failed.values())[-3:]}); is the data intact?"
                )
            rounds += 1
            retry = []
            for row, error in failed:
                video = int(video_index[row])
                self._fail(video, error)
                failures[video] = self.failed[video]
                if substitute:
                    replacement = self._substitute(video, set(video_index.tolist()))
                    pick = int(caption_index[row] - self.pool_start[video]) % int(self.pool_size[replacement])
                    video_index[row], caption_index[row] = replacement, self.pool_start[replacement] + pick
                    retry.append(row)
            if not retry:
                break
            rows_t = torch.tensor(retry)
            again, failed_again = self.source.clips(video_index[rows_t], frame_index[rows_t])
            clips[rows_t] = again
            failed = [(retry[i], error) for i, error in failed_again]
        return {
            "frames": clips,
            "input_ids": self.caption_ids[caption_index],
            "attention_mask": self.caption_mask[caption_index],
            "video_index": video_index,
            "caption_index": caption_index,
            "failed": failures,
        }

    def to_model_input(self, frames: Tensor) -> Tensor:
        """uint8 (B, T, H, W, 3) on any device -> the model's normalised float (B, T, 3, H, W)."""
        return frames_to_model_input(frames, self.pixel_mean, self.pixel_std)

    def _substitute(self, video: int, in_batch: set[int]) -> int:
        """A good video to stand in for ``video``: deterministic, spread over the split (a run of bad
        files, e.g. one broken folder, is not tried one by one), and not already in the batch."""
        order = torch.randperm(len(self), generator=seeded_generator(video, 3)).tolist()
        for candidate in order:
            if candidate not in self._bad and candidate not in in_batch:
                return candidate
        for candidate in order:  # a split smaller than a batch: a repeat beats a crash
            if candidate not in self._bad:
                return candidate
        raise RuntimeError(f"every video of the split failed to decode, e.g. {list(self.failed.values())[:3]}")

    def train_batch(
        self, step: int, batch_size: int, num_frames: int, seed: int, rows: range | None = None
    ) -> dict[str, Any]:
        """The batch of training ``step``: epoch-wise shuffled videos (drop last), one random caption
        from each pool, segment-random frames. A pure function of ``(seed, step)``.

        The shuffle is reseeded every epoch; ``rows`` selects this rank's share of the global batch
        (a distributed sampler whose position is the step), and only those rows are assembled."""
        steps_per_epoch = len(self) // batch_size
        if steps_per_epoch == 0:
            raise ValueError(f"batch size {batch_size} exceeds the {len(self)} training videos")
        epoch, position = divmod(step, steps_per_epoch)
        if self.epoch_order is not None:
            order = self.epoch_order(epoch)
        else:
            order = torch.randperm(len(self), generator=seeded_generator(seed, 0, epoch))
        video_index = order[position * batch_size : (position + 1) * batch_size]
        g = seeded_generator(seed, 1, step)
        pick = (torch.rand(batch_size, generator=g) * self.pool_size[video_index]).long()
        caption_index = self.pool_start[video_index] + pick
        frame_index = segment_random_indices(self.num_slots, num_frames, batch_size, g)
        return self.batch(video_index, caption_index, frame_index, rows)

    def random_batch(
        self, step: int, batch_size: int, num_frames: int, seed: int, rows: range | None = None
    ) -> dict[str, Any]:
        """A batch of ``batch_size`` distinct random videos (all of them if fewer), for meta steps;
        ``rows`` selects this rank's share."""
        g = seeded_generator(seed, 2, step)
        video_index = torch.randperm(len(self), generator=g)[:batch_size]
        pick = (torch.rand(len(video_index), generator=g) * self.pool_size[video_index]).long()
        frame_index = segment_random_indices(self.num_slots, num_frames, len(video_index), g)
        caption_index = self.pool_start[video_index] + pick
        return self.batch(video_index, caption_index, frame_index, rows)

    def eval_video_batch(self, start: int, stop: int, num_frames: int) -> dict[str, Any]:
        """uint8 frames (B, T, H, W, 3) of videos ``start:stop``, uniformly sampled; a video that fails
        keeps blank frames (it stays in the evaluation) and is listed in ``failed``."""
        video_index = torch.arange(start, stop)
        frame_index = uniform_indices(self.num_slots, num_frames).expand(len(video_index), -1)
        batch = self.batch(video_index, self.pool_start[video_index], frame_index, substitute=False)
        return {"frames": batch["frames"], "failed": batch["failed"]}

    def eval_video_batches(
        self, batch_size: int, num_frames: int, videos: range | None = None, workers: int = 0
    ) -> Any:
        """Yield model inputs (B, T, 3, H, W) of every video (or those in ``videos``) in order."""
        videos = range(len(self)) if videos is None else videos
        starts = list(range(videos.start, videos.stop, batch_size))
        jobs = [(start, min(start + batch_size, videos.stop), num_frames) for start in starts]
        for batch in map_in_workers(_EvalBatch(self), jobs, workers):
            self.note_failures(batch["failed"])
            yield self.to_model_input(batch["frames"])


@dataclass
class _EvalBatch:
    clips: ClipSet

    def __call__(self, job: tuple[int, int, int]) -> dict[str, Any]:
        return self.clips.eval_video_batch(*job)


class _MapDataset(torch.utils.data.Dataset):
    def __init__(self, fn: Callable[[Any], Any], items: Sequence[Any]):
        self.fn, self.items = fn, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.fn(self.items[i])


def _one_thread(_: int) -> None:
    # Two CPU-heavy processes per core collapse throughput; decoding parallelism comes from the workers.
    torch.set_num_threads(1)


def map_in_workers(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> Any:
    """Yield ``fn(item)`` for every item in order, computed in ``workers`` processes (0: here)."""
    if workers <= 0:
        yield from map(fn, items)
        return
    loader = torch.utils.data.DataLoader(
        _MapDataset(fn, items),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        worker_init_fn=_one_thread,
        prefetch_factor=2,
    )
    yield from loader


def _file_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _probe_all(records: list[VideoRecord], desc: str, progress: bool) -> tuple[list[int], list[int], list[str]]:
    """Open every video's header: the kept record indices, their frame counts, and the failures."""
    kept, lengths, skipped = [], [], []
    for i, record in enumerate(tqdm(records, desc=desc, unit="video", disable=not progress, leave=False)):
        try:
            info = probe_video(record.video)
            if info.num_frames <= 0:
                raise VideoDecodeError(f"{record.video}: no frames")
        except VideoDecodeError as exc:
            warnings.warn(f"skipping video {exc}", stacklevel=2)
            skipped.append(str(exc))
            continue
        kept.append(i)
        lengths.append(info.num_frames)
    return kept, lengths, skipped


# Below this many videos a pool's start-up costs more than it saves.
_POOL_MIN_VIDEOS = 64


def _decode_one(task: tuple[int, Path, int, int]) -> tuple[int, Any, str | None]:
    """Worker: ``(index, frames as a uint8 numpy array or None, error or None)`` for one video."""
    i, video, frame_size, cached_frames = task
    try:
        total = probe_video(video).num_frames
        if total <= 0:
            raise VideoDecodeError(f"{video}: no frames")
        return i, decode_clip(video, uniform_indices(total, cached_frames).tolist(), frame_size).numpy(), None
    except VideoDecodeError as exc:
        return i, None, str(exc)


def _pool_init() -> None:
    torch.set_num_threads(1)  # parallelism is across videos


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which container limits set), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def decode_processes(num_videos: int) -> int:
    """Processes to decode ``num_videos`` with: one per core this process may use, at most 8, and 1 for
    a few videos or where ``fork`` is missing."""
    if num_videos < _POOL_MIN_VIDEOS or "fork" not in mp.get_all_start_methods():
        return 1
    return min(8, available_cores())


def _decode_all(
    records: list[VideoRecord], frame_size: int, cached_frames: int, desc: str, progress: bool
) -> tuple[list[int], list[Tensor], list[str]]:
    """Decode every record, in :func:`decode_processes` forked processes (the same frames in any number)."""
    tasks = [(i, record.video, frame_size, cached_frames) for i, record in enumerate(records)]
    processes = decode_processes(len(tasks))
    kept, clips, skipped = [], [], []
    results: Iterator[tuple[int, Any, str | None]]
    with contextlib.ExitStack() as stack:
        if processes > 1:
            # fork, like the DataLoader's workers: workers run PyAV and one-thread torch ops only.
            pool = stack.enter_context(mp.get_context("fork").Pool(processes, initializer=_pool_init))
            results = pool.imap(_decode_one, tasks, chunksize=8)  # in order
        else:
            results = map(_decode_one, tasks)
        for i, frames, error in tqdm(
            results, total=len(tasks), desc=desc, unit="video", disable=not progress, leave=False
        ):
            if error is not None:
                warnings.warn(f"skipping video {error}", stacklevel=2)
                skipped.append(error)
                continue
            kept.append(i)
            clips.append(torch.from_numpy(frames))
    return kept, clips, skipped


def _cache_key(
    name: str, records: list[VideoRecord], frame_size: int, cached_frames: int, annotation: Path | None
) -> tuple[str, str]:
    """(key stored in the cache, short hash for its file name): the split's videos, in order, with their
    file identities where they exist, the frame size and count."""
    digest = hashlib.blake2b(digest_size=16)
    for record in records:
        # The file's identity too: a video added, fixed or re-encoded since the cache was written is decoded again.
        try:
            stat = os.stat(record.video)
            identity = f"{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            identity = "missing"
        digest.update(f"{record.id}\0{record.video}\0{identity}\0".encode())
    ids = digest.hexdigest()
    key = json.dumps(
        [
            CACHE_VERSION,
            name,
            ids,
            _file_key(annotation) if annotation and annotation.exists() else "",
            frame_size,
            cached_frames,
        ]
    )
    return key, hashlib.blake2b(key.encode(), digest_size=6).hexdigest()


def load_frames(
    cache_dir: Path,
    name: str,
    records: list[VideoRecord],
    frame_size: int,
    cached_frames: int,
    progress: bool = True,
    annotation: Path | None = None,
) -> tuple[list[int], Tensor, list[str]]:
    """Decode (or load from cache) ``cached_frames`` frames of every record at ``frame_size``.

    Returns the indices of the records kept, frames uint8 (V, F, H, W, 3), and the skipped videos.
    The cache ``cache_dir/<name>_<hash>.safetensors`` is keyed by the split's videos (and the annotation
    file's identity), the frame size and count, and written atomically with the usual permissions (umask,
    so teammates sharing the folder can read it). A cache file that cannot be read (another user's,
    damaged) is a cache miss and a folder that cannot be written only costs the cache, each with a warning.
    """
    key, short = _cache_key(name, records, frame_size, cached_frames, annotation)
    cache = cache_dir / f"{name}_{frame_size}px_{cached_frames}f_{short}.safetensors"
    cached = _read_frame_cache(cache, key)
    if cached is not None:
        return cached
    kept, clips, skipped = _decode_all(records, frame_size, cached_frames, f"decode {name}", progress)
    if not clips:
        raise ValueError(f"{name}: none of the {len(records)} videos could be decoded")
    frames = torch.stack(clips)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as tmp:
            save_file(
                {"frames": frames.contiguous(), "kept": torch.tensor(kept, dtype=torch.long)},
                str(tmp),
                metadata={"key": key, "skipped": json.dumps(skipped)},
            )
    except (OSError, SafetensorError) as exc:  # safetensors reports a read-only folder as its own error
        warnings.warn(f"cannot write the frame cache {cache} ({exc}); decoding again next time", stacklevel=2)
    return kept, frames, skipped


def _read_frame_cache(cache: Path, key: str) -> tuple[list[int], Tensor, list[str]] | None:
    """``(kept, frames, skipped)`` from ``cache`` if it exists and holds ``key``, else None (a miss)."""
    try:
        if not cache.exists():
            return None
        with open(cache, "rb"):  # safetensors would report an unreadable file as "No such file or directory"
            pass
        with safe_open(str(cache), "pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("key") != key:
            return None
        tensors = load_file(str(cache))
        return tensors["kept"].tolist(), tensors["frames"], json.loads(meta["skipped"])
    except Exception as exc:  # unreadable or damaged: decoded again, never trusted, never fatal
        warnings.warn(f"ignoring unreadable frame cache {cache} ({exc}); decoding the videos again", stacklevel=3)
        return None


def load_clipset(
    name: str,
    records: list[VideoRecord],
    tokenize: Callable[[list[str]], tuple[Tensor, Tensor]],
    frame_size: int,
    num_slots: int,
    caption_sources: Sequence[str] = ("human", "lvlm"),
    decode: str = "cache",
    cache_dir: Path | None = None,
    annotation: Path | None = None,
    pixel_mean: Sequence[float] = PIXEL_MEAN,
    pixel_std: Sequence[float] = PIXEL_STD,
    progress: bool = True,
) -> ClipSet:
    """Open the videos of one split and tokenise the captions of the chosen sources.

    Args:
        name: split name, for messages and the cache file.
        records: the split's records.
        tokenize: ``texts -> (input_ids, attention_mask)``.
        frame_size: S, frames are S x S (shorter side resized, centre crop).
        num_slots: F, frames cached per video (``decode="cache"``) or sampling slots (``"stream"``).
        caption_sources: which caption sources enter the pools.
        decode: "cache" (decode once, keep in memory, cache on disk in ``cache_dir``) or "stream"
            (probe the headers now, decode every batch).
        annotation: the annotation file, whose identity keys the cache.
    """
    if decode == "cache":
        if cache_dir is None:
            raise ValueError("decode='cache' needs a cache_dir")
        kept, frames, skipped = load_frames(cache_dir, name, records, frame_size, num_slots, progress, annotation)
        source: FrameSource = CachedFrames(frames)
    elif decode == "stream":
        kept, lengths, skipped = _probe_all(records, f"probe {name}", progress)
        if not kept:
            raise ValueError(f"{name}: none of the {len(records)} videos could be opened")
        source = StreamedFrames([records[i].video for i in kept], lengths, num_slots, frame_size)
    else:
        raise ValueError(f"data.decode must be 'cache' or 'stream', got {decode!r}")
    return build_clipset(
        name, [records[i] for i in kept], source, tokenize, caption_sources, skipped, pixel_mean, pixel_std
    )


def build_clipset(
    name: str,
    records: list[VideoRecord],
    source: FrameSource,
    tokenize: Callable[[list[str]], tuple[Tensor, Tensor]],
    caption_sources: Sequence[str],
    skipped: list[str],
    pixel_mean: Sequence[float] = PIXEL_MEAN,
    pixel_std: Sequence[float] = PIXEL_STD,
) -> ClipSet:
    """A clip set of ``records`` (one per video of ``source``, in order) with the captions of
    ``caption_sources`` tokenised; a video without such a caption is dropped and added to ``skipped``."""
    texts: list[str] = []
    sources: list[str] = []
    noises: list[str] = []
    starts: list[int] = []
    sizes: list[int] = []
    owners: list[int] = []
    kept_records: list[VideoRecord] = []
    kept_rows: list[int] = []
    for row, record in enumerate(records):
        pool = [c for c in record.captions if c.source in caption_sources]
        if not pool:
            warnings.warn(
                f"{name}: video {record.id} has no caption from sources {list(caption_sources)}; skipped", stacklevel=2
            )
            skipped.append(f"{record.video}: no caption from {list(caption_sources)}")
            continue
        starts.append(len(texts))
        sizes.append(len(pool))
        owners.extend([len(kept_records)] * len(pool))
        texts.extend(c.text for c in pool)
        sources.extend(c.source for c in pool)
        noises.extend(c.noise for c in pool)
        kept_records.append(record)
        kept_rows.append(row)
    if not kept_records:
        raise ValueError(f"{name}: no usable video (decoded and captioned)")
    if len(kept_rows) != len(records):
        source = source.select(torch.tensor(kept_rows))
    ids, mask = tokenize(texts)
    return ClipSet(
        records=kept_records,
        source=source,
        caption_ids=ids,
        caption_mask=mask,
        pool_start=torch.tensor(starts),
        pool_size=torch.tensor(sizes),
        caption_video=torch.tensor(owners),
        caption_source=sources,
        caption_noise=noises,
        caption_text=texts,
        skipped=skipped,
        pixel_mean=tuple(pixel_mean),
        pixel_std=tuple(pixel_std),
    )
