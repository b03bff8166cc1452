"""Embeddings for users: encode videos and texts with a trained model, build an index, search it.

    encoder = Encoder.from_pretrained("runs/msrvtt")         # a run, a checkpoint or an exported folder
    video_emb, failed = encoder.encode_videos(["a.mp4", "b.mp4"])   # (N, D), L2-normalised
    text_emb = encoder.encode_texts(["a man is cooking"])           # (M, D)

An index folder (``mama embed``) holds::

    index.json            model path, frames, embedding width, counts
    videos.jsonl          one {"id", "video"} per row of the video embeddings
    videos.safetensors    "embeddings": (N, D) float32
    texts.jsonl / texts.safetensors   the same for captions (with --texts)
    failed.txt            videos that could not be decoded ("path: error"), left out of the index

Long jobs are written in parts of ``part_size`` videos under ``parts/``; an interrupted ``mama embed``
re-run with the same arguments reuses the finished parts and loses at most the part in flight.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from mama.config import ModelConfig
from mama.data.clips import decode_clip, frames_to_model_input, map_in_workers
from mama.data.sampling import uniform_indices
from mama.data.video import VideoDecodeError, probe_video
from mama.models import get_spec
from mama.models.registry import VideoTextModel

__all__ = ["Encoder", "build_index", "load_index", "search"]


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

    @functools.cached_property
    def dim(self) -> int:
        """Embedding width D (what the model returns; e.g. CLIP's projection size, not model.embed_dim)."""
        ids, mask = self.tokenizer(["a"])
        with torch.no_grad():
            return int(cast(VideoTextModel, self.model).encode_text(ids.to(self.device), mask.to(self.device)).shape[1])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

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
        frames = num_frames or trained_frames
        model.eval().to(device)
        return cls(model_cfg, model, tokenizer, frames, max(slots, frames), str(path.resolve()))

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


def _write_atomic(path: Path, tensors: dict[str, Tensor], rows: list[dict[str, Any]] | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)
    if rows is not None:
        jsonl = path.with_suffix(".jsonl")
        tmp = jsonl.with_name(f".{jsonl.name}.tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(jsonl)


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

    Resumable: finished parts under ``out_dir/parts`` are reused when the same videos are embedded
    with the same model again. Returns the contents of ``index.json``.
    """
    out = Path(out_dir)
    parts_dir = out / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    job = {
        "model": encoder.source,
        "num_frames": encoder.num_frames,
        "videos": [[i, str(p)] for i, p in videos],
        "part_size": part_size,
    }
    job_file = parts_dir / "job.json"
    if job_file.exists() and json.loads(job_file.read_text()) != job:
        shutil.rmtree(parts_dir)  # a different job: its parts do not belong to this index
        parts_dir.mkdir(parents=True)
    job_file.write_text(json.dumps(job))

    embeddings, failed = [], []
    num_parts = -(-len(videos) // part_size)
    for part in tqdm(range(num_parts), desc="index parts", unit="part", disable=not progress or num_parts < 2):
        part_file = parts_dir / f"part_{part:05d}.safetensors"
        chunk = videos[part * part_size : (part + 1) * part_size]
        if part_file.exists():
            saved = load_file(str(part_file))
            emb = saved["embeddings"]
            errors = json.loads((part_file.with_suffix(".json")).read_text())
        else:
            emb, errors = encoder.encode_videos([p for _, p in chunk], batch_size, workers, progress)
            (part_file.with_suffix(".json")).write_text(json.dumps(errors))
            _write_atomic(part_file, {"embeddings": emb})
        embeddings.append(emb)
        failed.extend(errors)
    all_emb = torch.cat(embeddings) if embeddings else torch.zeros(0, encoder.dim)
    ok = ~torch.isnan(all_emb).any(dim=1)
    kept = [{"id": vid, "video": str(path)} for (vid, path), good in zip(videos, ok.tolist(), strict=True) if good]
    _write_atomic(out / "videos.safetensors", {"embeddings": all_emb[ok]}, kept)
    info: dict[str, Any] = {
        "model": encoder.source,
        "num_frames": encoder.num_frames,
        "dim": int(all_emb.shape[1]),
        "num_videos": len(kept),
        "num_failed": len(failed),
    }
    if texts:
        text_emb = encoder.encode_texts([t for _, t in texts])
        _write_atomic(
            out / "texts.safetensors", {"embeddings": text_emb}, [{"video_id": v, "text": t} for v, t in texts]
        )
        info["num_texts"] = len(texts)
    (out / "failed.txt").write_text("".join(f"{line}\n" for line in failed))
    (out / "index.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(parts_dir)
    return info


def load_index(index_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], Tensor, list[dict[str, Any]]]:
    """(index.json, video embeddings (N, D), one {"id", "video"} per row) of an index folder."""
    index_dir = Path(index_dir)
    if not (index_dir / "index.json").is_file():
        raise FileNotFoundError(f"{index_dir}: not an index folder (no index.json); build one with `mama embed`")
    info = json.loads((index_dir / "index.json").read_text())
    emb = load_file(str(index_dir / "videos.safetensors"))["embeddings"]
    rows = [json.loads(line) for line in (index_dir / "videos.jsonl").read_text(encoding="utf-8").splitlines() if line]
    return info, emb, rows


def search(
    index_dir: str | os.PathLike[str], queries: Sequence[str], top_k: int = 10, encoder: Encoder | None = None
) -> list[list[dict[str, Any]]]:
    """The ``top_k`` videos of the index for each text query: ``[{"rank", "id", "video", "score"}, ...]``.

    ``encoder`` defaults to the model the index was built with.
    """
    info, video_emb, rows = load_index(index_dir)
    encoder = encoder or Encoder.from_pretrained(info["model"], num_frames=info["num_frames"])
    query_emb = encoder.encode_texts(list(queries))
    if query_emb.shape[1] != video_emb.shape[1]:
        raise ValueError(
            f"query embeddings have width {query_emb.shape[1]}, the index {video_emb.shape[1]}: another model?"
        )
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


def export_pretrained(checkpoint: Path, out: Path) -> Path:
    """Write the video-text model of a run (or checkpoint) as a self-contained folder for
    :meth:`Encoder.from_pretrained`. For a QA run that is its encoder (the answer head stays in the run)."""
    from mama.models.pretrained import save_pretrained
    from mama.tasks import load_run

    trained = load_run(checkpoint)
    cfg = trained.cfg
    slots = cfg.data.cached_frames or 2 * cfg.data.num_frames
    extra = {
        "data": {"num_frames": cfg.data.num_frames, "num_slots": slots, "frame_size": cfg.data.frame_size},
        "task": cfg.task,
    }
    return save_pretrained(out, cfg.model, trained.encoder, trained.task.tokenizer, extra=extra)
