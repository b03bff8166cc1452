"""Embeddings for users: encode videos and texts with a trained model, build an index, search it.

    encoder = Encoder.from_pretrained("runs/msrvtt")         # a run, a checkpoint or an exported folder
    video_emb, failed = encoder.encode_videos(["a.mp4", "b.mp4"])   # (N, D), L2-normalised
    text_emb = encoder.encode_texts(["a man is cooking"])           # (M, D)
    build_index(encoder, [("a", Path("a.mp4"))], "index/")          # mama embed (append=True: --append)
    build_index_from_shards(encoder, "shards/shard-{000000..000009}.tar", "index/")   # mama embed --shards
    index = open_index("index/")                                    # verified once, then searched
    index.search_texts(["a man is cooking"], encoder, k=10)         # [[{"rank", "id", "video", "score"}]]
    index.search_vectors(video_emb, k=10)                           # videos like a video

An index folder (``mama embed``) holds::

    index.json            the manifest: model path and fingerprint, frames, embedding width, counts, and
                          the size and sha256 of every other file
    videos.jsonl          one {"id", "video"} per row of the video embeddings (a shard sample's "video":
                          "<shard url>#<key>.<ext>")
    videos.safetensors    "embeddings": (N, D) float32, L2-normalised: the source of truth, from which
                          the FAISS index can always be rebuilt
    videos.faiss          the FAISS index searched (row i = video i): exact inner product up to 30k
                          videos, IVF above (see mama.inference.vector_index); its type and parameters
                          are in the manifest's "vector_index"
    texts.jsonl / texts.safetensors   the same for captions (with --texts)
    failed.txt            videos that could not be decoded ("path: error"), left out of the index

Nothing in an index is trusted blindly: :func:`load_index` checks every file against the manifest's
size and sha256, the row counts against each other and every embedding for finite values and unit
norm, and :func:`search` checks that the model it encodes queries with has the fingerprint of the one
that built the index (the sha256 of its weights file and tokenizer files, plus the settings that
determine an embedding: model config, frames, sampling slots, pixel normalisation). A failed check
raises :class:`IndexIntegrityError`, which names the file and the problem.

Long jobs are written in parts of ``part_size`` videos under ``parts/``; an interrupted ``mama embed``
re-run with the same arguments and the same model (same fingerprint) reuses the finished parts and
loses at most the part in flight. Each part records the size and sha256 of its embeddings file and is
checked row by row before reuse; a part that fails a check is embedded again, with a warning.
``mama embed --append`` adds videos to an existing index without embedding its videos again; the new
index is assembled beside the old one and swapped in whole, so an interrupted append leaves the old one.
``mama embed --shards`` reads WebDataset shards (:mod:`mama.data.shards`) with one part per shard, and
under torchrun splits the shards across ranks; rank 0 assembles the same index one process writes.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from mama import distributed
from mama.checkpoint import MANIFEST as CHECKPOINT_MANIFEST
from mama.checkpoint import STATE_JSON, file_record, write_text_atomic
from mama.config import ModelConfig
from mama.data.clips import decode_clip, frames_to_model_input, map_in_workers
from mama.data.sampling import uniform_indices
from mama.data.shards import ShardError, ShardSample, decode_sample_clip, expand_urls, iter_tar_samples
from mama.data.video import VideoDecodeError, probe_video
from mama.fileio import fsync_path, set_default_mode, sha256_file
from mama.inference.vector_index import IndexSpec, VectorIndex, faiss_version, resolve_spec
from mama.models import get_spec
from mama.models.registry import VideoTextModel

__all__ = [
    "Encoder",
    "IndexIntegrityError",
    "SearchIndex",
    "build_index",
    "build_index_from_shards",
    "load_index",
    "open_index",
    "sample_name",
    "search",
]

INDEX_FILE = "index.json"
VECTOR_INDEX_FILE = "videos.faiss"
INDEX_FORMAT = "mama-index"
INDEX_VERSION = 1
# float32 embeddings normalised by the model are within ~1e-6 of unit norm; a row further off than this
# was not written by a model (flipped bits, a hand-edited file).
NORM_TOLERANCE = 1e-3
# Model config fields that do not change what the model computes, left out of the fingerprint.
_NOT_FINGERPRINTED = ("pretrained", "grad_checkpointing")


class IndexIntegrityError(ValueError):
    """An index folder is incomplete, corrupt, or was built by another model than the one searching it."""


@dataclass
class _ClipReader:
    """Picklable ``path -> (uint8 (T, S, S, 3) or None, error)`` for worker processes."""

    num_frames: int
    frame_size: int
    num_slots: int

    def __call__(self, path: Path) -> tuple[Tensor | None, str]:
        try:
            total = probe_video(path).num_frames
            if total <= 0:
                raise VideoDecodeError(f"{path}: no frames")
            # The frames evaluation sees: the centres of num_frames segments over the video's sampling
            # slots (mama.data.clips), so an index embeds a video exactly as `mama eval` does.
            frame_index = uniform_indices(total, self.num_slots)[uniform_indices(self.num_slots, self.num_frames)]
            return decode_clip(path, frame_index.tolist(), self.frame_size), ""
        except VideoDecodeError as exc:
            return None, str(exc)


def sample_name(sample: ShardSample) -> str:
    """How an index names a shard sample: ``"<shard url>#<key>.<ext>"`` (its rows' "video")."""
    return f"{sample.url}#{sample.key}.{sample.video_ext}"


@dataclass
class _SampleReader:
    """Picklable ``ShardSample -> (uint8 (T, S, S, 3) or None, error)``: the frames :class:`_ClipReader`
    takes from the same video as a file (same slots, same frame indices, same decoder)."""

    num_frames: int
    frame_size: int
    num_slots: int

    def __call__(self, sample: ShardSample) -> tuple[Tensor | None, str]:
        slots = uniform_indices(self.num_slots, self.num_frames)
        try:
            return decode_sample_clip(sample, self.num_slots, slots, self.frame_size)[0], ""
        except VideoDecodeError as exc:
            # decode_sample_clip names the member "<url>/<key>.<ext>"; the index names it as its rows do.
            return None, str(exc).replace(f"{sample.url}/{sample.key}.{sample.video_ext}", sample_name(sample), 1)


@dataclass
class Encoder:
    """A trained model ready to embed: model in eval mode, its tokenizer and its video preprocessing."""

    model_cfg: ModelConfig
    model: nn.Module
    tokenizer: Any
    num_frames: int
    num_slots: int  # sampling slots per video (data.cached_frames), which fix where the frames fall
    source: str = ""  # where it was loaded from
    # sha256 of the files the model was loaded from: {"weights": {name: sha256}, "tokenizer": {name: sha256}}
    # (set by from_pretrained; an Encoder assembled by hand has none and cannot build or search an index).
    file_hashes: dict[str, dict[str, str]] | None = None

    @functools.cached_property
    def dim(self) -> int:
        """Embedding width D (what the model returns; e.g. CLIP's projection size, not model.embed_dim)."""
        ids, mask = self.tokenizer(["a"])
        with torch.no_grad():
            return int(cast(VideoTextModel, self.model).encode_text(ids.to(self.device), mask.to(self.device)).shape[1])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def fingerprint(self) -> dict[str, Any]:
        """What determines this encoder's embeddings: ``{"sha256", "weights", "tokenizer", "settings"}``.

        ``weights`` and ``tokenizer`` map file names to their sha256 (for a run: the checkpoint's
        manifest, which lists the sha256 of every checkpoint file); ``settings`` holds the model config,
        frames per video, sampling slots and pixel normalisation; ``sha256`` hashes all three.
        """
        if self.file_hashes is None:
            raise ValueError(
                f"encoder {self.source or '(assembled by hand)'} has no fingerprint of its files: "
                "load it with Encoder.from_pretrained to build or search an index"
            )
        spec = get_spec(self.model_cfg.name)
        model = {k: v for k, v in dataclasses.asdict(self.model_cfg).items() if k not in _NOT_FINGERPRINTED}
        settings = {
            "model": model,
            "num_frames": self.num_frames,
            "num_slots": self.num_slots,
            "pixel_mean": list(spec.pixel_mean),
            "pixel_std": list(spec.pixel_std),
        }
        parts = {
            "weights": self.file_hashes["weights"],
            "tokenizer": self.file_hashes["tokenizer"],
            "settings": settings,
        }
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        return {"sha256": digest, **parts}

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], device: str = "cpu", num_frames: int | None = None
    ) -> Encoder:
        """Load from a folder written by ``save_pretrained``/``mama export``, a run folder or a checkpoint.

        ``num_frames``: frames per video (default: what the model was trained with).
        """
        path = Path(path)
        if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
            from mama.models.pretrained import from_pretrained

            file_hashes = _file_hashes({"model.safetensors": path / "model.safetensors"}, path / "tokenizer")
            model_cfg, model, tokenizer = from_pretrained(path)
            extra = json.loads((path / "config.json").read_text()).get("data", {})
            trained_frames = int(extra.get("num_frames", model_cfg.max_frames))
            slots = int(extra.get("num_slots", 2 * trained_frames))
        else:
            from mama.tasks import load_run

            trained = load_run(path)
            cfg = trained.cfg
            model_cfg, model, tokenizer, trained_frames = (
                cfg.model,
                trained.encoder,
                trained.task.tokenizer,
                cfg.data.num_frames,
            )
            slots = cfg.data.cached_frames or 2 * cfg.data.num_frames
            # The checkpoint manifest holds the sha256 of every checkpoint file and load_run has verified
            # them, so its own hash stands for the weights without reading them a second time.
            tokenizer_dir = json.loads((trained.path / STATE_JSON).read_text()).get("tokenizer_dir", "tokenizer")
            file_hashes = _file_hashes(
                {f"{trained.path.name}/{CHECKPOINT_MANIFEST}": trained.path / CHECKPOINT_MANIFEST},
                trained.path.parent.parent / tokenizer_dir,
            )
        frames = num_frames or trained_frames
        model.eval().to(device)
        return cls(model_cfg, model, tokenizer, frames, max(slots, frames), str(path.resolve()), file_hashes)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> Tensor:
        """(N,) strings -> (N, D) float32 L2-normalised embeddings on CPU."""
        out = []
        model = cast(VideoTextModel, self.model)
        for start in range(0, len(texts), batch_size):
            ids, mask = self.tokenizer(list(texts[start : start + batch_size]))
            out.append(model.encode_text(ids.to(self.device), mask.to(self.device)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    def encode_videos(
        self, paths: Sequence[str | os.PathLike[str]], batch_size: int = 16, workers: int = 0, progress: bool = False
    ) -> tuple[Tensor, list[str]]:
        """Embed video files (or frame folders): ``num_frames`` uniformly sampled frames each.

        Returns (N, D) float32 L2-normalised embeddings on CPU, in the order of ``paths``, and the
        failures as "path: error" strings; a failed video's row is NaN (never a made-up embedding).
        """
        reader = _ClipReader(self.num_frames, self.model_cfg.frame_size, self.num_slots)
        return self._encode(reader, [Path(p) for p in paths], batch_size, workers, progress)

    def encode_samples(
        self, samples: Sequence[ShardSample], batch_size: int = 16, workers: int = 0, progress: bool = False
    ) -> tuple[Tensor, list[str]]:
        """Embed WebDataset shard samples (:func:`mama.data.shards.iter_tar_samples`) from their bytes,
        decoded exactly as :meth:`encode_videos` decodes the same video as a file: the same rows.

        Returns (N, D) as :meth:`encode_videos`; failures read ``"<url>#<key>.<ext>: error"``.
        """
        reader = _SampleReader(self.num_frames, self.model_cfg.frame_size, self.num_slots)
        return self._encode(reader, samples, batch_size, workers, progress)

    @torch.no_grad()
    def _encode(
        self,
        reader: Callable[[Any], tuple[Tensor | None, str]],
        items: Sequence[Any],
        batch_size: int,
        workers: int,
        progress: bool,
    ) -> tuple[Tensor, list[str]]:
        """(N, D) embeddings of ``items`` read into clips by ``reader`` (NaN rows where it failed), failures."""
        spec = get_spec(self.model_cfg.name)
        rows = torch.full((len(items), self.dim), float("nan"))
        failed: list[str] = []
        pending: list[tuple[int, Tensor]] = []

        def flush() -> None:
            if not pending:
                return
            clips = torch.stack([clip for _, clip in pending])  # (B, T, S, S, 3)
            video = frames_to_model_input(clips, spec.pixel_mean, spec.pixel_std).to(self.device)
            rows[[i for i, _ in pending]] = cast(VideoTextModel, self.model).encode_video(video).float().cpu()
            pending.clear()

        results = map_in_workers(reader, items, workers)
        for i, (clip, error) in enumerate(
            tqdm(results, total=len(items), desc="embed videos", unit="video", disable=not progress)
        ):
            if clip is None:
                warnings.warn(f"skipping video {error}", stacklevel=3)
                failed.append(error)
                continue
            pending.append((i, clip))
            if len(pending) == batch_size:
                flush()
        flush()
        return rows, failed


def _file_hashes(weights: dict[str, Path], tokenizer_dir: Path) -> dict[str, dict[str, str]]:
    """sha256 of the weights files (by the given names) and of every file under ``tokenizer_dir``."""
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"{tokenizer_dir}: tokenizer folder not found")
    tokenizer = {
        path.relative_to(tokenizer_dir).as_posix(): sha256_file(path)
        for path in sorted(tokenizer_dir.rglob("*"))
        if path.is_file()
    }
    return {"weights": {name: sha256_file(path) for name, path in weights.items()}, "tokenizer": tokenizer}


def _write_file(path: Path, write: Callable[[Path], object]) -> dict[str, Any]:
    """``write`` a temporary sibling, then rename it to ``path``; returns its ``{"bytes", "sha256"}``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        set_default_mode(tmp)  # readable by whoever shares the index folder, as the umask allows
        record = file_record(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return record


def _save_embeddings(path: Path, emb: Tensor) -> dict[str, Any]:
    return _write_file(path, lambda tmp: save_file({"embeddings": emb.contiguous()}, str(tmp)))


def _save_text(path: Path, lines: Sequence[str]) -> dict[str, Any]:
    return _write_file(path, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8"))


def _save_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return _save_text(path, [json.dumps(row, ensure_ascii=False) for row in rows])


def _check_embeddings(emb: Tensor, where: str, dim: int) -> None:
    """Every row of ``emb`` (N, dim) float32 is finite with unit norm, or IndexIntegrityError naming ``where``."""
    if emb.ndim != 2 or emb.dtype != torch.float32 or emb.shape[1] != dim:
        raise IndexIntegrityError(f"{where}: embeddings {tuple(emb.shape)} {emb.dtype}, expected (N, {dim}) float32")
    finite = torch.isfinite(emb).all(dim=1)
    if not finite.all():
        bad = (~finite).nonzero()[:, 0].tolist()
        raise IndexIntegrityError(
            f"{where}: {len(bad)} embedding rows hold NaN or infinite values (row {bad[0]} first)"
        )
    norm = emb.norm(dim=1)
    off = (norm - 1).abs() > NORM_TOLERANCE
    if off.any():
        bad = off.nonzero()[:, 0].tolist()
        raise IndexIntegrityError(
            f"{where}: {len(bad)} embedding rows are not L2-normalised (row {bad[0]} has norm {float(norm[bad[0]]):.6g})"
        )


def _read_embeddings(path: Path) -> Tensor:
    try:
        return load_file(str(path))["embeddings"]
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise IndexIntegrityError(f"{path}: unreadable embeddings file ({exc!r})") from None


def _verify_file(path: Path, record: Any, manifest: Path) -> None:
    """``path`` has the size and sha256 ``record`` (from ``manifest``) gives, or IndexIntegrityError."""
    if not isinstance(record, dict) or set(record) != {"bytes", "sha256"}:
        raise IndexIntegrityError(f"{manifest}: malformed entry for {path.name!r}")
    if not path.is_file():
        raise IndexIntegrityError(f"{path}: missing (listed in {manifest})")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise IndexIntegrityError(
            f"{path}: {size} bytes, {manifest.name} says {record['bytes']} (truncated or replaced?)"
        )
    if sha256_file(path) != record["sha256"]:
        raise IndexIntegrityError(f"{path}: sha256 differs from {manifest.name} (corrupt, or changed after indexing)")


def _load_part(part_file: Path, num_rows: int | None, dim: int) -> tuple[Tensor, dict[str, Any]] | None:
    """A finished part's (embeddings (rows, dim), record), verified; None (with a warning) to redo it.

    ``num_rows``: the rows the part must hold (None: as many as its record says, for a shard's part,
    whose sample count is known only once the shard is read). The record holds ``"errors"`` (failed
    videos) and whatever else its writer stored beside them (:func:`_save_part`).
    """
    record_file = part_file.with_suffix(".json")
    if not record_file.is_file():  # written last: without it the part was in flight
        return None
    try:
        record = json.loads(record_file.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("errors"), list):
            raise IndexIntegrityError(f"{record_file}: not a part record")
        rows = record.get("rows")
        if not isinstance(rows, int) or (num_rows is not None and rows != num_rows):
            raise IndexIntegrityError(
                f"{record_file}: not a record of {num_rows if num_rows is not None else 'N'} rows"
            )
        _verify_file(part_file, {"bytes": record.get("bytes"), "sha256": record.get("sha256")}, record_file)
        emb = _read_embeddings(part_file)
        if emb.shape != (rows, dim):
            raise IndexIntegrityError(f"{part_file}: embeddings {tuple(emb.shape)}, expected ({rows}, {dim})")
        _check_embeddings(emb[~torch.isnan(emb).any(dim=1)], f"{part_file} (rows of decoded videos)", dim)
    except (IndexIntegrityError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        warnings.warn(f"embedding part {part_file.name} again: {exc}", stacklevel=3)
        return None
    return emb, record


def _save_part(part_file: Path, emb: Tensor, errors: list[str], **extra: Any) -> None:
    """Commit a part: its embeddings (rows, D), NaN rows for failed videos, then its record (``rows``,
    ``bytes``, ``sha256``, ``errors`` and ``extra``), written last because it marks the part finished."""
    record = _save_embeddings(part_file, emb)
    write_text_atomic(
        part_file.with_suffix(".json"), json.dumps({"rows": emb.shape[0], **record, "errors": errors, **extra})
    )


def _start_job(parts_dir: Path, job: dict[str, Any]) -> None:
    """Keep the parts under ``parts_dir`` only if an earlier run of the same ``job`` (inputs, model
    fingerprint, frames) wrote them; then record ``job`` for the next run to compare."""
    parts_dir.mkdir(parents=True, exist_ok=True)
    job_file = parts_dir / "job.json"
    try:
        same_job = json.loads(job_file.read_text()) == job if job_file.exists() else True
    except (json.JSONDecodeError, UnicodeDecodeError):
        same_job = False
    if not same_job:
        shutil.rmtree(parts_dir)  # a different job (or model): its parts do not belong to this index
        parts_dir.mkdir(parents=True)
    write_text_atomic(job_file, json.dumps(job))


@dataclass
class _Contents:
    """What an index folder holds besides its manifest, in memory."""

    video_emb: Tensor  # (N, D) float32, L2-normalised
    videos: list[dict[str, Any]]  # one {"id", "video"} per row of video_emb
    failed: list[str]  # "path: error" per video left out
    text_emb: Tensor | None = None  # (M, D) float32, L2-normalised
    texts: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # one {"video_id", "text"} per row

    def extended(self, more: _Contents) -> _Contents:
        """These rows followed by ``more``'s: what embedding both inputs in one go gives."""
        text_parts = [t for t in (self.text_emb, more.text_emb) if t is not None]
        return _Contents(
            torch.cat([self.video_emb, more.video_emb]),
            self.videos + more.videos,
            self.failed + [line for line in more.failed if line not in self.failed],
            torch.cat(text_parts) if text_parts else None,
            self.texts + more.texts,
        )


def _embed_in_parts(
    encoder: Encoder,
    videos: Sequence[tuple[str, Path]],
    parts_dir: Path,
    batch_size: int,
    workers: int,
    part_size: int,
    progress: bool,
) -> tuple[Tensor, list[dict[str, Any]], list[str]]:
    """Embed ``videos`` in resumable parts under ``parts_dir``: (embeddings (N, D) of the decoded videos,
    their {"id", "video"} rows, the failures as "path: error")."""
    dim = encoder.dim
    _start_job(
        parts_dir,
        {
            "model": encoder.source,
            "model_fingerprint": encoder.fingerprint()["sha256"],
            "num_frames": encoder.num_frames,
            "videos": [[i, str(p)] for i, p in videos],
            "part_size": part_size,
        },
    )
    embeddings, failed = [], []
    num_parts = -(-len(videos) // part_size)
    for part in tqdm(range(num_parts), desc="index parts", unit="part", disable=not progress or num_parts < 2):
        part_file = parts_dir / f"part_{part:05d}.safetensors"
        chunk = videos[part * part_size : (part + 1) * part_size]
        done = _load_part(part_file, len(chunk), dim)
        if done is None:
            emb, errors = encoder.encode_videos([p for _, p in chunk], batch_size, workers, progress)
            _check_embeddings(emb[~torch.isnan(emb).any(dim=1)], f"model {encoder.source}", dim)
            _save_part(part_file, emb, errors)
        else:
            emb, errors = done[0], [str(e) for e in done[1]["errors"]]
        embeddings.append(emb)
        failed.extend(errors)
    all_emb = torch.cat(embeddings) if embeddings else torch.zeros(0, dim)
    ok = ~torch.isnan(all_emb).any(dim=1)
    kept = [{"id": vid, "video": str(path)} for (vid, path), good in zip(videos, ok.tolist(), strict=True) if good]
    return all_emb[ok], kept, failed


def build_index(
    encoder: Encoder,
    videos: Sequence[tuple[str, Path]],
    out_dir: str | os.PathLike[str],
    texts: Sequence[tuple[str, str]] = (),
    batch_size: int = 16,
    workers: int = 0,
    part_size: int = 1024,
    progress: bool = True,
    index_type: str | None = None,
    append: bool = False,
) -> dict[str, Any]:
    """Embed ``videos`` (id, path) and ``texts`` (video id, caption) into the index folder ``out_dir``.

    ``index_type``: the FAISS index searched (:data:`mama.inference.vector_index.INDEX_TYPES`; ``auto``
    is exact up to :data:`~mama.inference.vector_index.AUTO_FLAT_MAX` videos, IVF above). Default: the
    type the index was built with when appending, else ``auto``.

    ``append``: add ``videos`` to the index already in ``out_dir`` without embedding its videos again;
    videos (and their captions) whose id is in the index already are skipped. The index must have been
    built by the same model (same fingerprint), or IndexIntegrityError names what differs. The result is
    byte for byte the index that embedding the old inputs followed by the new ones in one go gives (the
    FAISS index is rebuilt from all embeddings, so an IVF index's cells are trained on every video). The
    new index is written into a folder beside ``out_dir`` and swapped in whole, so an interrupted append
    leaves the old index as it was (and the finished parts of the new videos, reused by a re-run).

    Resumable: finished parts under ``out_dir/parts`` are reused (after checking their sha256 and every
    row) when the same videos are embedded with the same model, i.e. the same fingerprint, again.
    Returns the contents of ``index.json``.
    """
    out = Path(out_dir)
    requested = index_type or "auto"
    base: _Contents | None = None
    if append:
        base_info, base = _read_contents(out, encoder)
        known = {row["id"] for row in base.videos}
        videos = [(vid, path) for vid, path in videos if vid not in known]
        texts = [(vid, text) for vid, text in texts if vid not in known]
        # An index written before mama kept a FAISS index searched exactly, like "auto" at its size.
        requested = index_type or base_info.get("vector_index", {}).get("requested", "auto")
    resolve_spec(requested, 0)  # an unknown index type fails now, not after hours of embedding
    video_emb, kept, failed = _embed_in_parts(encoder, videos, out / "parts", batch_size, workers, part_size, progress)
    return _finish_index(out, encoder, _Contents(video_emb, kept, failed), texts, base, requested, progress)


def _finish_index(
    out: Path,
    encoder: Encoder,
    contents: _Contents,
    texts: Sequence[tuple[str, str]],
    base: _Contents | None,
    requested: str,
    progress: bool,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Embed the captions ``texts``, put ``contents`` after the index ``base`` (when appending), build
    the FAISS index and write the index folder ``out`` (swapped in whole over ``base``); drop the parts.
    ``extra``: more manifest entries. Returns the manifest."""
    dim = encoder.dim
    if texts:
        contents.text_emb = encoder.encode_texts([t for _, t in texts])
        _check_embeddings(contents.text_emb, f"model {encoder.source} (captions)", dim)
        contents.texts = [{"video_id": v, "text": t} for v, t in texts]
    if base is not None:
        contents = base.extended(contents)
    spec = resolve_spec(requested, len(contents.videos))
    vectors = VectorIndex.build(contents.video_emb.numpy(), spec, progress=progress)

    def write(folder: Path) -> dict[str, Any]:
        return _write_index(folder, contents, vectors, requested, encoder, extra)

    if base is not None:
        return _replace_folder(out, write)
    # Until the new manifest is written the folder is not an index, so a crash in between leaves no
    # index.json that could vouch for a mix of old and new files.
    (out / INDEX_FILE).unlink(missing_ok=True)
    info = write(out)
    for path in out.iterdir():  # on disk before the parts that could rebuild them are deleted
        if path.is_file():
            fsync_path(path)
    fsync_path(out)
    shutil.rmtree(out / "parts")
    return info


def build_index_from_shards(
    encoder: Encoder,
    urls: str | Sequence[str],
    out_dir: str | os.PathLike[str],
    with_texts: bool = False,
    batch_size: int = 16,
    workers: int = 0,
    progress: bool = True,
    index_type: str | None = None,
    append: bool = False,
) -> dict[str, Any]:
    """Embed every sample of the WebDataset shards ``urls`` into the index folder ``out_dir``
    (``mama embed --shards``); the shards are those ``mama shard`` writes (:mod:`mama.data.shards`).

    ``urls``: a brace pattern (``shards/shard-{000000..000009}.tar``) or a list of local paths,
    ``http(s)://`` URLs or ``pipe:`` commands. A sample's id is its ``<key>.json``'s ``"id"`` (else its
    key), its row's "video" is ``"<url>#<key>.<ext>"``, and with ``with_texts`` its human captions are
    embedded too. The bytes are decoded exactly as :meth:`Encoder.encode_videos` decodes the same video
    as a file, so the embeddings equal those of the files. Rows follow the shard order of ``urls``,
    then the member order inside each shard.

    Each shard is one part under ``out_dir/parts`` (its embeddings, rows, captions and errors),
    committed when the shard is done: a re-run with the same arguments and model skips the finished
    shards, so an interruption loses at most the shards in flight. A shard is read whole into memory
    (``mama shard`` writes 256 MiB by default).

    Under ``torchrun`` (:mod:`mama.distributed` initialised), shard ``i`` goes to rank
    ``i % world_size``; each rank embeds its shards into their parts, and rank 0 assembles the index
    once every rank is done, so ``out_dir`` must be on a file system all ranks share. The index is
    byte for byte the one a single process builds (and a run can be resumed with another world size).

    A sample that does not decode is left out and listed in ``failed.txt``, with a warning; a shard
    that cannot be read (in full) is warned about and listed in the manifest's ``unreadable_shards``
    (its samples read before the damage are kept), and read again by a re-run of an interrupted job.
    ``index_type`` and ``append`` as in :func:`build_index` (appending skips samples whose id the index
    holds). Returns the contents of ``index.json`` (on every rank).
    """
    out = Path(out_dir)
    shard_urls = expand_urls(urls)
    rank, world = distributed.rank(), distributed.world_size()
    requested = index_type or "auto"
    job: dict[str, Any] = {
        "model": encoder.source,
        "model_fingerprint": encoder.fingerprint()["sha256"],
        "num_frames": encoder.num_frames,
        "shards": shard_urls,
        "texts": with_texts,
    }
    base: _Contents | None = None
    known: set[str] = set()
    if append:
        base_info, base = _read_contents(out, encoder)
        known = {row["id"] for row in base.videos}
        requested = index_type or base_info.get("vector_index", {}).get("requested", "auto")
        job["append_to"] = base_info["files"]["videos.jsonl"]["sha256"]  # parts of another base do not count
    resolve_spec(requested, 0)  # an unknown index type fails now, not after hours of embedding
    parts_dir = out / "parts"
    if rank == 0:
        _start_job(parts_dir, job)
        for marker in parts_dir.glob("rank-*.done"):  # of an earlier, interrupted run
            marker.unlink()
    distributed.barrier()  # no rank writes a part before rank 0 has cleared a stale job's parts

    dim = encoder.dim
    mine = range(rank, len(shard_urls), world)
    desc = "embed shards" if world == 1 else f"embed shards (rank {rank})"
    for i in tqdm(mine, desc=desc, unit="shard", disable=not progress):
        part_file = _shard_part_file(parts_dir, i)
        done = _load_part(part_file, None, dim)
        if done is None or done[1].get("url") != shard_urls[i] or done[1].get("shard_error"):
            _embed_shard(encoder, shard_urls[i], part_file, known, with_texts, batch_size, workers, progress)
    _wait_for_ranks(parts_dir, rank, world)

    info: dict[str, Any] | None = None
    if rank == 0:
        contents, texts, unreadable = _shard_contents(shard_urls, parts_dir, dim)
        extra = {"num_shards": len(shard_urls), "num_unreadable_shards": len(unreadable),
                 "unreadable_shards": unreadable}  # fmt: skip
        info = _finish_index(out, encoder, contents, texts, base, requested, progress, extra)
    return cast(dict[str, Any], distributed.broadcast_object(info))


# How often a rank that finished its shards looks whether the others have (seconds).
_RANK_POLL_S = 0.5


def _shard_part_file(parts_dir: Path, shard: int) -> Path:
    return parts_dir / f"shard_{shard:06d}.safetensors"


def _sample_id(sample: ShardSample) -> str:
    video_id = sample.meta.get("id")
    return sample.key if video_id is None or video_id == "" else str(video_id)


def _human_captions(sample: ShardSample) -> list[str]:
    captions = sample.meta.get("captions")
    if not isinstance(captions, list):
        return []
    return [str(c["text"]) for c in captions if isinstance(c, dict) and c.get("source") == "human" and c.get("text")]


def _embed_shard(
    encoder: Encoder,
    url: str,
    part_file: Path,
    known: set[str],
    with_texts: bool,
    batch_size: int,
    workers: int,
    progress: bool,
) -> None:
    """Embed the samples of one shard (those whose id is not in ``known``) and commit them as a part."""
    samples: list[ShardSample] = []
    shard_error = None
    try:
        for sample in iter_tar_samples(url):
            if _sample_id(sample) not in known:
                samples.append(sample)
    except ShardError as exc:  # the samples read before the damage are kept
        shard_error = str(exc)
        warnings.warn(f"skipping the rest of shard {exc}", stacklevel=3)
    emb, errors = encoder.encode_samples(samples, batch_size, workers, progress)
    _check_embeddings(emb[~torch.isnan(emb).any(dim=1)], f"model {encoder.source}", encoder.dim)
    videos = [{"id": _sample_id(s), "video": sample_name(s)} for s in samples]
    texts = [[_sample_id(s), text] for s in samples for text in _human_captions(s)] if with_texts else []
    _save_part(part_file, emb, errors, url=url, videos=videos, texts=texts, shard_error=shard_error)


def _wait_for_ranks(parts_dir: Path, rank: int, world: int) -> None:
    """Mark this rank done and wait until every rank is. The wait polls the shared parts folder rather
    than sitting in a collective, which would time out (gloo: after 30 minutes) when one rank's shards
    take that much longer than another's; the barrier at the end then only meets ranks already done."""
    if world <= 1:
        return
    write_text_atomic(parts_dir / f"rank-{rank}.done", "")
    while not all((parts_dir / f"rank-{r}.done").exists() for r in range(world)):
        time.sleep(_RANK_POLL_S)
    distributed.barrier()


def _shard_contents(
    shard_urls: list[str], parts_dir: Path, dim: int
) -> tuple[_Contents, list[tuple[str, str]], list[str]]:
    """Every shard's part, in shard order: (the decoded samples' contents, the captions (video id,
    text), the errors of shards that could not be read in full)."""
    embeddings: list[Tensor] = []
    videos: list[dict[str, Any]] = []
    failed: list[str] = []
    texts: list[tuple[str, str]] = []
    unreadable: list[str] = []
    for i, url in enumerate(shard_urls):
        part_file = _shard_part_file(parts_dir, i)
        done = _load_part(part_file, None, dim)
        if done is None or done[1].get("url") != url:
            raise IndexIntegrityError(
                f"{part_file}: no finished part for shard {url} (did a rank fail?); run the same command again"
            )
        emb, record = done
        rows = record.get("videos")
        if not isinstance(rows, list) or len(rows) != emb.shape[0] or not isinstance(record.get("texts"), list):
            raise IndexIntegrityError(f"{part_file.with_suffix('.json')}: malformed rows for {emb.shape[0]} samples")
        ok = ~torch.isnan(emb).any(dim=1)
        embeddings.append(emb[ok])
        videos.extend(row for row, good in zip(rows, ok.tolist(), strict=True) if good)
        failed.extend(str(e) for e in record["errors"])
        texts.extend((str(video_id), str(text)) for video_id, text in record["texts"])
        if record.get("shard_error"):
            unreadable.append(str(record["shard_error"]))
    video_emb = torch.cat(embeddings) if embeddings else torch.zeros(0, dim)
    return _Contents(video_emb, videos, failed), texts, unreadable


def _write_index(
    folder: Path,
    contents: _Contents,
    vectors: VectorIndex,
    requested: str,
    encoder: Encoder,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write every file of an index and then its manifest (with the entries ``extra``) into ``folder``;
    returns the manifest."""
    files = {
        "videos.safetensors": _save_embeddings(folder / "videos.safetensors", contents.video_emb),
        "videos.jsonl": _save_jsonl(folder / "videos.jsonl", contents.videos),
        VECTOR_INDEX_FILE: _write_file(folder / VECTOR_INDEX_FILE, vectors.save),
    }
    if contents.text_emb is not None:
        files["texts.safetensors"] = _save_embeddings(folder / "texts.safetensors", contents.text_emb)
        files["texts.jsonl"] = _save_jsonl(folder / "texts.jsonl", contents.texts)
    else:  # captions of an earlier index in this folder do not belong to this one
        (folder / "texts.safetensors").unlink(missing_ok=True)
        (folder / "texts.jsonl").unlink(missing_ok=True)
    files["failed.txt"] = _save_text(folder / "failed.txt", contents.failed)
    info: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "model": encoder.source,
        "num_frames": encoder.num_frames,
        "dim": encoder.dim,
        "num_videos": len(contents.videos),
        "num_failed": len(contents.failed),
    }
    if contents.texts:
        info["num_texts"] = len(contents.texts)
    info.update(extra or {})
    info["vector_index"] = {
        "file": VECTOR_INDEX_FILE,
        **vectors.spec.to_json(),
        "requested": requested,
        "faiss_version": faiss_version(),
    }
    info.update(model_fingerprint=encoder.fingerprint(), files=files)
    write_text_atomic(folder / INDEX_FILE, json.dumps(info, indent=2))
    return info


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False
    where the system or file system cannot."""
    if sys.platform != "linux":
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc < 2.28, musl
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_folder(folder: Path, write: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """``write`` a new version of ``folder`` into a sibling folder, then swap it in; returns what
    ``write`` returned. The swap is one atomic rename on Linux; elsewhere two renames, and a crash
    between them leaves the old folder at ``.NAME.old-*`` beside it (never deleted automatically)."""
    for stale in folder.parent.glob(f".{folder.name}.append-*"):  # left by a killed append
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.append-", dir=folder.parent))
    try:
        shutil.copymode(folder, staging)
        info = write(staging)
        for path in staging.iterdir():  # on disk before the swap makes them the index
            fsync_path(path)
        fsync_path(staging)
        if not _exchange(staging, folder):
            old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
            folder.rename(old)
            try:
                staging.rename(folder)
            except BaseException:
                old.rename(folder)
                raise
            staging = old
        fsync_path(folder.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after the swap: the old index
    return info


def _read_manifest(index_dir: Path) -> dict[str, Any]:
    path = index_dir / INDEX_FILE
    if not path.is_file():
        unfinished = " (an unfinished `mama embed`: run it again to finish)" if (index_dir / "parts").is_dir() else ""
        raise FileNotFoundError(f"{index_dir}: not an index folder (no {INDEX_FILE}){unfinished}")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexIntegrityError(f"{path}: unreadable JSON ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != INDEX_FORMAT:
        raise IndexIntegrityError(
            f"{path}: not a {INDEX_FORMAT} manifest with checksums (written by an older mama?); "
            "build the index again with `mama embed`"
        )
    if info.get("version") != INDEX_VERSION:
        raise IndexIntegrityError(f"{path}: unsupported index version {info.get('version')!r}")
    files = info.get("files")
    required = ("model", "num_frames", "dim", "num_videos", "model_fingerprint")
    if not isinstance(files, dict) or any(key not in info for key in required):
        raise IndexIntegrityError(f"{path}: incomplete manifest (needs {', '.join(required)} and files)")
    for name in ("videos.safetensors", "videos.jsonl"):
        if name not in files:
            raise IndexIntegrityError(f"{path}: does not list {name}")
    if any(Path(name).name != name for name in files):
        raise IndexIntegrityError(f"{path}: lists a file outside the index folder")
    record = info.get("vector_index")
    if record is not None and (
        not isinstance(record, dict) or record.get("file") != VECTOR_INDEX_FILE or VECTOR_INDEX_FILE not in files
    ):
        raise IndexIntegrityError(f"{path}: malformed vector_index entry, or {VECTOR_INDEX_FILE} not listed")
    return info


def _read_jsonl_rows(path: Path, keys: set[str]) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise IndexIntegrityError(f"{path}: line {number}: not JSON ({exc})") from None
        if not isinstance(row, dict) or not keys <= set(row):
            raise IndexIntegrityError(f"{path}: line {number}: not a {sorted(keys)} row")
        rows.append(row)
    return rows


def _verified(index_dir: Path) -> tuple[dict[str, Any], Tensor, list[dict[str, Any]]]:
    """(manifest, video embeddings, rows) after checking every file's size and sha256 and the rows."""
    info = _read_manifest(index_dir)
    manifest = index_dir / INDEX_FILE
    for name, record in info["files"].items():
        _verify_file(index_dir / name, record, manifest)
    emb_path, rows_path = index_dir / "videos.safetensors", index_dir / "videos.jsonl"
    emb = _read_embeddings(emb_path)
    _check_embeddings(emb, str(emb_path), int(info["dim"]))
    rows = _read_jsonl_rows(rows_path, {"id", "video"})
    if not len(rows) == emb.shape[0] == info["num_videos"]:
        raise IndexIntegrityError(
            f"{rows_path}: {len(rows)} rows, but {emb_path.name} holds {emb.shape[0]} embeddings "
            f"and {INDEX_FILE} says {info['num_videos']} videos"
        )
    return info, emb, rows


def _read_vector_index(index_dir: Path, info: dict[str, Any], emb: Tensor) -> VectorIndex:
    """The FAISS index of a verified folder, checked against its embeddings ``emb`` (N, D)."""
    record = info.get("vector_index")
    if record is None:  # written before mama kept a FAISS index: exact search over the embeddings
        return VectorIndex.build(emb.numpy(), "flat")
    path = index_dir / VECTOR_INDEX_FILE
    try:
        spec = IndexSpec.from_json(record)
    except ValueError as exc:
        raise IndexIntegrityError(f"{index_dir / INDEX_FILE}: vector_index: {exc}") from None
    try:
        vectors = VectorIndex.load(path, spec)
    except ValueError as exc:  # the message names the file
        raise IndexIntegrityError(str(exc)) from None
    if len(vectors) != emb.shape[0] or vectors.dim != emb.shape[1]:
        raise IndexIntegrityError(
            f"{path}: {len(vectors)} vectors of width {vectors.dim}, but videos.safetensors holds "
            f"{emb.shape[0]} embeddings of width {emb.shape[1]}"
        )
    # A few rows compared exactly: a FAISS file of another index, listed with its own checksum, fails here.
    sample = sorted({int(i) for i in torch.linspace(0, emb.shape[0] - 1, min(16, emb.shape[0])).tolist()})
    if sample and not torch.equal(torch.from_numpy(vectors.reconstruct(sample)), emb[sample]):
        raise IndexIntegrityError(f"{path}: its vectors differ from the embeddings in videos.safetensors")
    return vectors


def load_index(index_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], Tensor, list[dict[str, Any]]]:
    """(index.json, video embeddings (N, D), one {"id", "video"} per row) of an index folder, verified.

    Raises:
        FileNotFoundError: ``index_dir`` holds no ``index.json``.
        IndexIntegrityError: a file is missing, truncated, corrupt (sha256) or inconsistent (row counts,
            width, an embedding that is not finite or not unit norm, a FAISS index that does not hold
            these embeddings); the message names the file.
    """
    index_dir = Path(index_dir)
    info, emb, rows = _verified(index_dir)
    _read_vector_index(index_dir, info, emb)
    return info, emb, rows


def _read_contents(index_dir: Path, encoder: Encoder) -> tuple[dict[str, Any], _Contents]:
    """A verified index built by ``encoder``'s model, to append to: (manifest, contents)."""
    info, emb, rows = load_index(index_dir)
    check_fingerprint(info, encoder, index_dir, doing="append to")
    failed: list[str] = []
    if "failed.txt" in info["files"]:
        failed = [line for line in (index_dir / "failed.txt").read_text(encoding="utf-8").splitlines() if line]
    contents = _Contents(emb, rows, failed)
    if "texts.safetensors" in info["files"]:
        text_path = index_dir / "texts.safetensors"
        contents.text_emb = _read_embeddings(text_path)
        _check_embeddings(contents.text_emb, str(text_path), int(info["dim"]))
        contents.texts = _read_jsonl_rows(index_dir / "texts.jsonl", {"video_id", "text"})
        if len(contents.texts) != contents.text_emb.shape[0]:
            raise IndexIntegrityError(
                f"{index_dir / 'texts.jsonl'}: {len(contents.texts)} rows, but "
                f"texts.safetensors holds {contents.text_emb.shape[0]} embeddings"
            )
    return info, contents


def check_fingerprint(
    info: dict[str, Any], encoder: Encoder, index_dir: str | os.PathLike[str], doing: str = "search"
) -> None:
    """Raise IndexIntegrityError unless ``encoder`` is the model (same fingerprint) that built the index;
    the message names what differs (weights, tokenizer, settings such as the frames per video) and says
    the index cannot be ``doing`` ("search", "append to") with this model."""
    built, now = info["model_fingerprint"], encoder.fingerprint()
    if isinstance(built, dict) and built.get("sha256") == now["sha256"]:
        return
    built = built if isinstance(built, dict) else {}
    differ = [part for part in ("weights", "tokenizer", "settings") if built.get(part) != now[part]]
    detail = ""
    if "settings" in differ and isinstance(built.get("settings"), dict):
        then_settings = {**built["settings"], **built["settings"].get("model", {})}
        now_settings = {**now["settings"], **now["settings"]["model"]}
        changed = [
            f"{key} {then_settings.get(key)!r} when built, {value!r} now"
            for key, value in now_settings.items()
            if key != "model" and then_settings.get(key) != value
        ]
        detail = f" ({'; '.join(changed)})" if changed else ""
    raise IndexIntegrityError(
        f"{Path(index_dir) / INDEX_FILE}: cannot {doing} this index with {encoder.source}: the index was built "
        f"by another model than {encoder.source} is now (model fingerprint {str(built.get('sha256'))[:12]} when "
        f"built, {now['sha256'][:12]} now; {' and '.join(differ or ['fingerprint'])} differ{detail}: re-exported "
        f"or retrained since?). Build the index again with `mama embed --model {encoder.source}`"
    )


def _check_queries(queries: list[str]) -> None:
    if not queries:
        raise ValueError("no query given: search needs at least one text query")
    for number, query in enumerate(queries, start=1):
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"query {number} is empty ({query!r}): give some words to search for")


def _check_top_k(top_k: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")


@dataclass
class SearchIndex:
    """An index folder opened for searching (:func:`open_index`): verified once, then searched any number
    of times. Holds the manifest, the rows and the FAISS index, not the embeddings matrix.

        index = open_index("index/")
        index.search_texts(["a man is cooking"], k=5)           # with the model that built the index
        video_emb, _ = encoder.encode_videos(["query.mp4"])    # the same model (index.check_encoder)
        index.search_vectors(video_emb, k=5)                  # videos like a video
    """

    path: Path
    info: dict[str, Any]
    rows: list[dict[str, Any]]  # one {"id", "video"} per row of the index
    vectors: VectorIndex
    _encoder: Encoder | None = dataclasses.field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def dim(self) -> int:
        """Embedding width D."""
        return int(self.info["dim"])

    def check_encoder(self, encoder: Encoder) -> None:
        """IndexIntegrityError unless ``encoder`` is the model (same fingerprint) that built this index."""
        check_fingerprint(self.info, encoder, self.path)

    def encoder(self, device: str = "cpu") -> Encoder:
        """The model that built the index (loaded from the manifest's path on first use, then kept)."""
        if self._encoder is None:
            encoder = Encoder.from_pretrained(self.info["model"], device=device, num_frames=self.info["num_frames"])
            self.check_encoder(encoder)
            self._encoder = encoder
        return self._encoder

    def search_vectors(self, emb: Tensor | np.ndarray, k: int = 10, **params: int) -> list[list[dict[str, Any]]]:
        """The ``k`` best videos for each query embedding: (Q, D) float32, L2-normalised rows from the
        model that built the index -> Q lists of ``{"rank", "id", "video", "score"}`` (score: cosine).

        ``k`` above the index size is clamped. ``params`` override the index's search setting for this
        call (``nprobe`` for an IVF index, ``ef_search`` for HNSW). An approximate index can return
        fewer than ``k`` videos for a query whose neighbourhood it does not reach.

        Raises:
            ValueError: ``k`` not a positive integer; ``emb`` not (Q, D) or holding NaN/infinite rows
                (e.g. the row of a video that failed to decode).
        """
        _check_top_k(k)
        queries = emb.detach().float().cpu().numpy() if isinstance(emb, Tensor) else np.asarray(emb, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query embeddings of shape {queries.shape}, expected (Q, {self.dim}) for {self.path}")
        bad = ~np.isfinite(queries).all(axis=1)
        if bad.any():
            raise ValueError(f"query embedding {int(bad.argmax())} holds NaN or infinite values (a failed video?)")
        scores, found = self.vectors.search(queries, k, **params)
        return [
            [
                {"rank": r + 1, **self.rows[i], "score": round(float(s), 6)}
                for r, (s, i) in enumerate(zip(row_scores.tolist(), row_ids.tolist(), strict=True))
                if i >= 0
            ]
            for row_scores, row_ids in zip(scores, found, strict=True)
        ]

    def search_texts(
        self, queries: str | Sequence[str], encoder: Encoder | None = None, k: int = 10, **params: int
    ) -> list[list[dict[str, Any]]]:
        """The ``k`` best videos for each text query (see :meth:`search_vectors`). ``encoder``: default
        the model that built the index; either way its fingerprint must match the index's.

        Raises:
            ValueError: no query, an empty or whitespace-only query, or ``k`` not a positive integer.
            IndexIntegrityError: ``encoder`` is another model than the one that built the index.
        """
        queries = [queries] if isinstance(queries, str) else list(queries)
        _check_queries(queries)
        _check_top_k(k)
        if encoder is None:
            encoder = self.encoder()
        else:
            self.check_encoder(encoder)
        return self.search_vectors(encoder.encode_texts(queries), k, **params)


def open_index(index_dir: str | os.PathLike[str]) -> SearchIndex:
    """Open an index folder for searching, after the checks of :func:`load_index` (every file's size and
    sha256, rows, embeddings, the FAISS index against the embeddings). Raises as :func:`load_index`."""
    index_dir = Path(index_dir)
    info, emb, rows = _verified(index_dir)
    vectors = _read_vector_index(index_dir, info, emb)
    return SearchIndex(index_dir, info, rows, vectors)


def search(
    index_dir: str | os.PathLike[str], queries: str | Sequence[str], top_k: int = 10, encoder: Encoder | None = None
) -> list[list[dict[str, Any]]]:
    """The ``top_k`` videos of the index for each text query: ``[{"rank", "id", "video", "score"}, ...]``.

    ``encoder`` defaults to the model the index was built with; either way its fingerprint must match
    the index's. A ``top_k`` above the number of videos in the index is clamped: each list then holds
    every video, ranked. To search one index many times, :func:`open_index` it once instead.

    Raises:
        ValueError: no query, an empty or whitespace-only query, or ``top_k`` not a positive integer.
        IndexIntegrityError: the index fails a check of :func:`load_index`, or another model built it.
    """
    queries = [queries] if isinstance(queries, str) else list(queries)
    _check_queries(queries)
    _check_top_k(top_k)
    return open_index(index_dir).search_texts(queries, encoder, top_k)


def list_inputs(
    videos: Path | None = None, annotations: Path | None = None, format: str = "jsonl", with_texts: bool = False
) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
    """What ``mama embed`` embeds: (video id, path) pairs and (video id, caption) pairs.

    With ``annotations`` (one split in any ``data.format``), its videos (found under ``videos`` by id)
    and, with ``with_texts``, its human captions; otherwise every video under the folder ``videos``.
    """
    from mama.data.datasets import VideoIndex, read_dataset

    if annotations is not None:
        records = read_dataset(format, annotations, videos)
        texts = [(r.id, c.text) for r in records for c in r.captions if c.source == "human"] if with_texts else []
        return [(r.id, r.video) for r in records], texts
    if videos is None:
        raise ValueError("give a folder of videos (--videos) or an annotation file (--annotations)")
    if with_texts:
        raise ValueError("--texts needs an annotation file (--annotations) to take the captions from")
    index = VideoIndex(videos)
    found = sorted(index.items())
    if not found:
        raise ValueError(f"{videos}: no video files or frame folders found")
    return found, []


def _is_saved_model(folder: Path) -> bool:
    """Whether ``folder`` holds a model written by ``save_pretrained`` / ``mama export`` (its config.json)."""
    from mama.models.pretrained import CONFIG_FILE

    try:
        payload = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(payload, dict) and "mama_version" in payload and "model" in payload


def export_pretrained(checkpoint: Path, out: Path, overwrite: bool = False) -> Path:
    """Write the video-text model of a run (or checkpoint) as a self-contained folder for
    :meth:`Encoder.from_pretrained`. For a QA run that is its encoder (the answer head stays in the run).

    An existing non-empty ``out`` is refused unless ``overwrite`` (``mama export --overwrite``), and even
    then only a model folder (one ``mama export`` wrote) is replaced. The replacement is atomic: the new
    model is written into a temporary folder beside ``out`` and swapped in, so a crash leaves the old
    model or the new one, never a mix. Indexes built with the old model then refuse to be searched with
    the new one (their model fingerprint no longer matches).
    """
    from mama.models.pretrained import save_pretrained
    from mama.tasks import load_run

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out}: folder exists and is not empty; pass --overwrite to replace it")
        if not _is_saved_model(out):
            raise FileExistsError(
                f"{out}: not a model folder written by `mama export` (no config.json with mama_version), "
                "so --overwrite does not replace it; choose another --out"
            )
    trained = load_run(checkpoint)
    cfg = trained.cfg
    slots = cfg.data.cached_frames or 2 * cfg.data.num_frames
    extra = {
        "data": {"num_frames": cfg.data.num_frames, "num_slots": slots, "frame_size": cfg.data.frame_size},
        "task": cfg.task,
    }
    return save_pretrained(out, cfg.model, trained.encoder, trained.task.tokenizer, extra=extra)
