"""In-memory clip sets: decoded frames plus tokenised caption pools, sampled deterministically.

Small datasets (SynthVL, a few thousand short clips) are decoded once at reduced resolution and
cached as safetensors next to the annotations, so three training variants in one demo decode nothing
twice. Every batch is a pure function of ``(seed, step)``: resuming at step k replays exactly the batches
an uninterrupted run would have seen, with no sampler state to save.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from mama.data.records import VideoRecord, read_jsonl
from mama.data.video import VideoDecodeError, count_frames, decode_frames

# Frames enter the model as (x / 255 - MEAN) / STD per channel.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.25
CACHE_VERSION = 1


def frames_to_model_input(frames: Tensor) -> Tensor:
    """uint8 (B, T, H, W, 3) -> float32 (B, T, 3, H, W), normalised."""
    # (B, T, H, W, 3) -> (B, T, 3, H, W)
    video = frames.permute(0, 1, 4, 2, 3).float().div_(255.0)
    return video.sub_(PIXEL_MEAN).div_(PIXEL_STD)


def uniform_indices(num_available: int, num_frames: int) -> Tensor:
    """Centres of ``num_frames`` equal segments of ``range(num_available)`` (repeats when too short)."""
    positions = (torch.arange(num_frames, dtype=torch.float64) + 0.5) * num_available / num_frames
    return positions.long().clamp_(0, num_available - 1)


def segment_random_indices(num_available: int, num_frames: int, batch: int, generator: torch.Generator) -> Tensor:
    """(batch, num_frames) indices: one random frame inside each of ``num_frames`` equal segments."""
    starts = torch.arange(num_frames, dtype=torch.float64) * num_available / num_frames
    width = num_available / num_frames
    jitter = torch.rand(batch, num_frames, generator=generator, dtype=torch.float64) * width
    return (starts + jitter).long().clamp_(0, num_available - 1)


def _generator(*keys: int) -> torch.Generator:
    # Mix the keys into one 63-bit seed so (seed, step) pairs never collide in practice.
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


@dataclass
class ClipSet:
    """Decoded clips of one split and their caption pools.

    Attributes:
        records: the kept records (videos that failed to decode are dropped and counted).
        frames: uint8 (V, F, H, W, 3), F cached frames per video spread uniformly over it.
        caption_ids, caption_mask: (C, L) tokenised captions of all pools, concatenated.
        pool_start, pool_size: (V,) each video's slice of the caption arrays.
        caption_video: (C,) index of each caption's video.
        caption_source, caption_noise: per caption, strings.
        skipped: paths of videos that could not be decoded, with the error.
    """

    records: list[VideoRecord]
    frames: Tensor
    caption_ids: Tensor
    caption_mask: Tensor
    pool_start: Tensor
    pool_size: Tensor
    caption_video: Tensor
    caption_source: list[str]
    caption_noise: list[str]
    caption_text: list[str]
    skipped: list[str]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_cached_frames(self) -> int:
        return self.frames.shape[1]

    def batch(self, video_index: Tensor, caption_index: Tensor, frame_index: Tensor, rows: range | None = None) -> dict[str, Any]:
        """Assemble a model batch. video_index (B,), caption_index (B,), frame_index (B, T); ``rows``
        keeps only those rows (this rank's share), so the others are never assembled."""
        if rows is not None:
            video_index, caption_index, frame_index = (t[rows.start : rows.stop] for t in (video_index, caption_index, frame_index))
        # (B, F, H, W, 3) gathered at (B, T) -> (B, T, H, W, 3)
        clips = self.frames[video_index[:, None], frame_index]
        return {
            "video": frames_to_model_input(clips),
            "input_ids": self.caption_ids[caption_index],
            "attention_mask": self.caption_mask[caption_index],
            "video_index": video_index,
            "caption_index": caption_index,
        }

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
        order = torch.randperm(len(self), generator=_generator(seed, 0, epoch))
        video_index = order[position * batch_size : (position + 1) * batch_size]
        g = _generator(seed, 1, step)
        pick = (torch.rand(batch_size, generator=g) * self.pool_size[video_index]).long()
        caption_index = self.pool_start[video_index] + pick
        frame_index = segment_random_indices(self.num_cached_frames, num_frames, batch_size, g)
        return self.batch(video_index, caption_index, frame_index, rows)

    def random_batch(
        self, step: int, batch_size: int, num_frames: int, seed: int, rows: range | None = None
    ) -> dict[str, Any]:
        """A batch of ``batch_size`` distinct random videos (all of them if fewer), for meta steps;
        ``rows`` selects this rank's share."""
        g = _generator(seed, 2, step)
        video_index = torch.randperm(len(self), generator=g)[:batch_size]
        pick = (torch.rand(len(video_index), generator=g) * self.pool_size[video_index]).long()
        frame_index = segment_random_indices(self.num_cached_frames, num_frames, len(video_index), g)
        caption_index = self.pool_start[video_index] + pick
        return self.batch(video_index, caption_index, frame_index, rows)

    def eval_video_batches(self, batch_size: int, num_frames: int, videos: range | None = None) -> Any:
        """Yield model inputs (B, T, 3, H, W) of every video (or those in ``videos``) in order,
        uniformly sampled frames."""
        frame_index = uniform_indices(self.num_cached_frames, num_frames)
        videos = range(len(self)) if videos is None else videos
        for start in range(videos.start, videos.stop, batch_size):
            stop = min(start + batch_size, videos.stop)
            # (B, F, H, W, 3) -> (B, T, H, W, 3)
            yield frames_to_model_input(self.frames[start:stop][:, frame_index])


def _file_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _decode_all(records: list[VideoRecord], frame_size: int, cached_frames: int, desc: str, progress: bool) -> tuple[list[int], list[Tensor], list[str]]:
    kept, clips, skipped = [], [], []
    for i, record in enumerate(tqdm(records, desc=desc, unit="video", disable=not progress, leave=False)):
        try:
            total = count_frames(record.video)
            if total <= 0:
                raise VideoDecodeError(f"{record.video}: no frames")
            indices = uniform_indices(total, cached_frames).tolist()
            clip = decode_frames(record.video, size=(frame_size, frame_size), indices=indices)
            if clip.shape[0] != cached_frames:
                raise VideoDecodeError(f"{record.video}: decoded {clip.shape[0]} of {cached_frames} frames")
        except VideoDecodeError as exc:
            warnings.warn(f"skipping video {record.video}: {exc}", stacklevel=2)
            skipped.append(f"{record.video}: {exc}")
            continue
        kept.append(i)
        clips.append(clip)
    return kept, clips, skipped


def load_frames(
    jsonl: Path, records: list[VideoRecord], frame_size: int, cached_frames: int, progress: bool = True
) -> tuple[list[int], Tensor, list[str]]:
    """Decode (or load from cache) ``cached_frames`` frames of every record at ``frame_size``.

    Returns the indices of the records kept, frames uint8 (V, F, H, W, 3), and the skipped videos.
    The cache lives in ``<jsonl folder>/.cache`` and is keyed by the annotation file's identity, the
    frame size and count; it is rewritten atomically.
    """
    cache_dir = jsonl.parent / ".cache"
    key = json.dumps([CACHE_VERSION, _file_key(jsonl), frame_size, cached_frames])
    cache = cache_dir / f"{jsonl.stem}_{frame_size}px_{cached_frames}f.safetensors"
    if cache.exists():
        try:
            from safetensors import safe_open

            with safe_open(str(cache), "pt") as handle:
                meta = handle.metadata() or {}
            if meta.get("key") == key:
                tensors = load_file(str(cache))
                return tensors["kept"].tolist(), tensors["frames"], json.loads(meta["skipped"])
        except Exception as exc:  # a damaged cache is rebuilt, never trusted
            warnings.warn(f"ignoring unreadable frame cache {cache}: {exc}", stacklevel=2)
    kept, clips, skipped = _decode_all(records, frame_size, cached_frames, f"decode {jsonl.name}", progress)
    if not clips:
        raise ValueError(f"{jsonl}: none of the {len(records)} videos could be decoded")
    frames = torch.stack(clips)
    cache_dir.mkdir(exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    save_file(
        {"frames": frames.contiguous(), "kept": torch.tensor(kept, dtype=torch.long)},
        str(tmp),
        metadata={"key": key, "skipped": json.dumps(skipped)},
    )
    tmp.replace(cache)
    return kept, frames, skipped


def load_clipset(
    jsonl: Path,
    tokenize: Callable[[list[str]], tuple[Tensor, Tensor]],
    frame_size: int,
    cached_frames: int,
    caption_sources: Sequence[str] = ("human", "lvlm"),
    records: list[VideoRecord] | None = None,
    progress: bool = True,
) -> ClipSet:
    """Read a JSONL split, decode its videos and tokenise the captions of the chosen sources."""
    jsonl = Path(jsonl)
    records = read_jsonl(jsonl) if records is None else records
    kept, frames, skipped = load_frames(jsonl, records, frame_size, cached_frames, progress)
    texts, sources, noises, starts, sizes, owners, kept_records, kept_frames = [], [], [], [], [], [], [], []
    for row, index in enumerate(kept):
        record = records[index]
        pool = [c for c in record.captions if c.source in caption_sources]
        if not pool:
            warnings.warn(f"{jsonl}: video {record.id} has no caption from sources {list(caption_sources)}; skipped", stacklevel=2)
            skipped.append(f"{record.video}: no caption from {list(caption_sources)}")
            continue
        starts.append(len(texts))
        sizes.append(len(pool))
        owners.extend([len(kept_records)] * len(pool))
        texts.extend(c.text for c in pool)
        sources.extend(c.source for c in pool)
        noises.extend(c.noise for c in pool)
        kept_records.append(record)
        kept_frames.append(row)
    if not kept_records:
        raise ValueError(f"{jsonl}: no usable video (decoded and captioned)")
    ids, mask = tokenize(texts)
    return ClipSet(
        records=kept_records,
        frames=frames[torch.tensor(kept_frames)] if len(kept_frames) != len(frames) else frames,
        caption_ids=ids,
        caption_mask=mask,
        pool_start=torch.tensor(starts),
        pool_size=torch.tensor(sizes),
        caption_video=torch.tensor(owners),
        caption_source=sources,
        caption_noise=noises,
        caption_text=texts,
        skipped=skipped,
    )
