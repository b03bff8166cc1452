"""Embeddings for users: encode videos and texts with a trained model, build an index, search it.

    encoder = Encoder.from_pretrained("runs/msrvtt")         # a run, a checkpoint or an exported folder
    video_emb, failed = encoder.encode_videos(["a.mp4", "b.mp4"])   # (N, D), L2-normalised
    text_emb = encoder.encode_texts(["a man is cooking"])           # (M, D)

An index folder (``mama embed``) holds::

    index.json            the manifest: model path and fingerprint, frames, embedding width, counts, and
                          the size and sha256 of every other file
    videos.jsonl          one {"id", "video"} per row of the video embeddings
    videos.safetensors    "embeddings": (N, D) float32, L2-normalised
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
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from mama.checkpoint import MANIFEST as CHECKPOINT_MANIFEST
from mama.checkpoint import STATE_JSON, file_record, sha256_file, write_text_atomic
from mama.config import ModelConfig
from mama.data.clips import decode_clip, frames_to_model_input, map_in_workers
from mama.data.sampling import uniform_indices
from mama.data.video import VideoDecodeError, probe_video
from mama.fileio import set_default_mode
from mama.models import get_spec
from mama.models.registry import VideoTextModel

__all__ = ["Encoder", "IndexIntegrityError", "build_index", "load_index", "search"]

INDEX_FILE = "index.json"
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

    @torch.no_grad()
    def encode_videos(
        self, paths: Sequence[str | os.PathLike[str]], batch_size: int = 16, workers: int = 0, progress: bool = False
    ) -> tuple[Tensor, list[str]]:
        """Embed video files (or frame folders): ``num_frames`` uniformly sampled frames each.

        Returns (N, D) float32 L2-normalised embeddings on CPU, in the order of ``paths``, and the
        failures as "path: error" strings; a failed video's row is NaN (never a made-up embedding).
        """
        spec = get_spec(self.model_cfg.name)
        reader = _ClipReader(self.num_frames, self.model_cfg.frame_size, self.num_slots)
        rows = torch.full((len(paths), self.dim), float("nan"))
        failed: list[str] = []
        pending: list[tuple[int, Tensor]] = []

        def flush() -> None:
            if not pending:
                return
            clips = torch.stack([clip for _, clip in pending])  # (B, T, S, S, 3)
            video = frames_to_model_input(clips, spec.pixel_mean, spec.pixel_std).to(self.device)
            rows[[i for i, _ in pending]] = cast(VideoTextModel, self.model).encode_video(video).float().cpu()
            pending.clear()

        results = map_in_workers(reader, [Path(p) for p in paths], workers)
        for i, (clip, error) in enumerate(
            tqdm(results, total=len(paths), desc="embed videos", unit="video", disable=not progress)
        ):
            if clip is None:
                warnings.warn(f"skipping video {error}", stacklevel=2)
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


def _load_part(part_file: Path, num_rows: int, dim: int) -> tuple[Tensor, list[str]] | None:
    """A finished part's (embeddings (num_rows, dim), errors), verified; None (with a warning) to redo it."""
    record_file = part_file.with_suffix(".json")
    if not record_file.is_file():  # written last: without it the part was in flight
        return None
    try:
        record = json.loads(record_file.read_text())
        if not isinstance(record, dict) or record.get("rows") != num_rows or not isinstance(record.get("errors"), list):
            raise IndexIntegrityError(f"{record_file}: not a record of {num_rows} rows")
        _verify_file(part_file, {"bytes": record.get("bytes"), "sha256": record.get("sha256")}, record_file)
        emb = _read_embeddings(part_file)
        if emb.shape != (num_rows, dim):
            raise IndexIntegrityError(f"{part_file}: embeddings {tuple(emb.shape)}, expected ({num_rows}, {dim})")
        _check_embeddings(emb[~torch.isnan(emb).any(dim=1)], f"{part_file} (rows of decoded videos)", dim)
    except (IndexIntegrityError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        warnings.warn(f"embedding part {part_file.name} again: {exc}", stacklevel=3)
        return None
    return emb, [str(e) for e in record["errors"]]


def build_index(
    encoder: Encoder,
    videos: Sequence[tuple[str, Path]],
    out_dir: str | os.PathLike[str],
    texts: Sequence[tuple[str, str]] = (),
    batch_size: int = 16,
    workers: int = 0,
    part_size: int = 1024,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed ``videos`` (id, path) and ``texts`` (video id, caption) into the index folder ``out_dir``.

    Resumable: finished parts under ``out_dir/parts`` are reused (after checking their sha256 and every
    row) when the same videos are embedded with the same model, i.e. the same fingerprint, again.
    Returns the contents of ``index.json``.
    """
    out = Path(out_dir)
    fingerprint = encoder.fingerprint()
    dim = encoder.dim
    parts_dir = out / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    job = {
        "model": encoder.source,
        "model_fingerprint": fingerprint["sha256"],
        "num_frames": encoder.num_frames,
        "videos": [[i, str(p)] for i, p in videos],
        "part_size": part_size,
    }
    job_file = parts_dir / "job.json"
    try:
        same_job = json.loads(job_file.read_text()) == job if job_file.exists() else True
    except (json.JSONDecodeError, UnicodeDecodeError):
        same_job = False
    if not same_job:
        shutil.rmtree(parts_dir)  # a different job (or model): its parts do not belong to this index
        parts_dir.mkdir(parents=True)
    write_text_atomic(job_file, json.dumps(job))

    embeddings, failed = [], []
    num_parts = -(-len(videos) // part_size)
    for part in tqdm(range(num_parts), desc="index parts", unit="part", disable=not progress or num_parts < 2):
        part_file = parts_dir / f"part_{part:05d}.safetensors"
        chunk = videos[part * part_size : (part + 1) * part_size]
        done = _load_part(part_file, len(chunk), dim)
        if done is None:
            emb, errors = encoder.encode_videos([p for _, p in chunk], batch_size, workers, progress)
            _check_embeddings(emb[~torch.isnan(emb).any(dim=1)], f"model {encoder.source}", dim)
            record = _save_embeddings(part_file, emb)
            # The record is written last: it marks the part finished and holds its checksum.
            write_text_atomic(
                part_file.with_suffix(".json"), json.dumps({"rows": len(chunk), **record, "errors": errors})
            )
        else:
            emb, errors = done
        embeddings.append(emb)
        failed.extend(errors)
    all_emb = torch.cat(embeddings) if embeddings else torch.zeros(0, dim)
    ok = ~torch.isnan(all_emb).any(dim=1)
    kept = [{"id": vid, "video": str(path)} for (vid, path), good in zip(videos, ok.tolist(), strict=True) if good]
    text_emb = encoder.encode_texts([t for _, t in texts]) if texts else None
    if text_emb is not None:
        _check_embeddings(text_emb, f"model {encoder.source} (captions)", dim)

    # Until the new manifest is written the folder is not an index, so a crash in between leaves no
    # index.json that could vouch for a mix of old and new files.
    (out / INDEX_FILE).unlink(missing_ok=True)
    files = {
        "videos.safetensors": _save_embeddings(out / "videos.safetensors", all_emb[ok]),
        "videos.jsonl": _save_jsonl(out / "videos.jsonl", kept),
    }
    if text_emb is not None:
        files["texts.safetensors"] = _save_embeddings(out / "texts.safetensors", text_emb)
        files["texts.jsonl"] = _save_jsonl(out / "texts.jsonl", [{"video_id": v, "text": t} for v, t in texts])
    else:  # captions of an earlier index in this folder do not belong to this one
        (out / "texts.safetensors").unlink(missing_ok=True)
        (out / "texts.jsonl").unlink(missing_ok=True)
    files["failed.txt"] = _save_text(out / "failed.txt", failed)
    info: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "model": encoder.source,
        "num_frames": encoder.num_frames,
        "dim": dim,
        "num_videos": len(kept),
        "num_failed": len(failed),
    }
    if texts:
        info["num_texts"] = len(texts)
    info.update(model_fingerprint=fingerprint, files=files)
    write_text_atomic(out / INDEX_FILE, json.dumps(info, indent=2))
    shutil.rmtree(parts_dir)
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
    return info


def _read_video_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise IndexIntegrityError(f"{path}: line {number}: not JSON ({exc})") from None
        if not isinstance(row, dict) or not {"id", "video"} <= set(row):
            raise IndexIntegrityError(f"{path}: line {number}: not an {{'id', 'video'}} row")
        rows.append(row)
    return rows


def load_index(index_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], Tensor, list[dict[str, Any]]]:
    """(index.json, video embeddings (N, D), one {"id", "video"} per row) of an index folder, verified.

    Raises:
        FileNotFoundError: ``index_dir`` holds no ``index.json``.
        IndexIntegrityError: a file is missing, truncated, corrupt (sha256) or inconsistent (row counts,
            width, an embedding that is not finite or not unit norm); the message names the file.
    """
    index_dir = Path(index_dir)
    info = _read_manifest(index_dir)
    manifest = index_dir / INDEX_FILE
    for name, record in info["files"].items():
        _verify_file(index_dir / name, record, manifest)
    emb_path, rows_path = index_dir / "videos.safetensors", index_dir / "videos.jsonl"
    emb = _read_embeddings(emb_path)
    _check_embeddings(emb, str(emb_path), int(info["dim"]))
    rows = _read_video_rows(rows_path)
    if not len(rows) == emb.shape[0] == info["num_videos"]:
        raise IndexIntegrityError(
            f"{rows_path}: {len(rows)} rows, but {emb_path.name} holds {emb.shape[0]} embeddings "
            f"and {INDEX_FILE} says {info['num_videos']} videos"
        )
    return info, emb, rows


def check_fingerprint(info: dict[str, Any], encoder: Encoder, index_dir: str | os.PathLike[str]) -> None:
    """Raise IndexIntegrityError unless ``encoder`` is the model (same fingerprint) that built the index."""
    built, now = info["model_fingerprint"], encoder.fingerprint()
    if isinstance(built, dict) and built.get("sha256") == now["sha256"]:
        return
    built = built if isinstance(built, dict) else {}
    differ = [part for part in ("weights", "tokenizer", "settings") if built.get(part) != now[part]]
    raise IndexIntegrityError(
        f"{Path(index_dir) / INDEX_FILE}: the index was built by another model than {encoder.source} is now "
        f"(model fingerprint {str(built.get('sha256'))[:12]} when built, {now['sha256'][:12]} now; "
        f"{' and '.join(differ or ['fingerprint'])} differ: re-exported or retrained since?). "
        f"Build the index again with `mama embed --model {encoder.source}`"
    )


def _check_queries(queries: list[str]) -> None:
    if not queries:
        raise ValueError("no query given: search needs at least one text query")
    for number, query in enumerate(queries, start=1):
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"query {number} is empty ({query!r}): give some words to search for")


def search(
    index_dir: str | os.PathLike[str], queries: str | Sequence[str], top_k: int = 10, encoder: Encoder | None = None
) -> list[list[dict[str, Any]]]:
    """The ``top_k`` videos of the index for each text query: ``[{"rank", "id", "video", "score"}, ...]``.

    ``encoder`` defaults to the model the index was built with; either way its fingerprint must match
    the index's. A ``top_k`` above the number of videos in the index is clamped: each list then holds
    every video, ranked.

    Raises:
        ValueError: no query, an empty or whitespace-only query, or ``top_k`` not a positive integer.
        IndexIntegrityError: the index fails a check of :func:`load_index`, or another model built it.
    """
    queries = [queries] if isinstance(queries, str) else list(queries)
    _check_queries(queries)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    info, video_emb, rows = load_index(index_dir)
    encoder = encoder or Encoder.from_pretrained(info["model"], num_frames=info["num_frames"])
    check_fingerprint(info, encoder, index_dir)
    query_emb = encoder.encode_texts(queries)
    scores = query_emb @ video_emb.T  # (Q, N)
    top = scores.topk(min(top_k, len(rows)), dim=1)
    return [
        [
            {"rank": r + 1, **rows[i], "score": round(float(s), 6)}
            for r, (s, i) in enumerate(zip(vals.tolist(), idx.tolist(), strict=True))
        ]
        for vals, idx in zip(top.values, top.indices, strict=True)
    ]


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
