"""Retrieval evaluation: encode a clip set (sharded over ranks) and rank both directions."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor

from mama.config import Config, Precision
from mama.data.clips import ClipSet
from mama.distributed import gather_rows, shard_range
from mama.metrics import bucket_recall, dsl_metrics, metrics_from_ranks, retrieval_ranks
from mama.models.registry import VideoTextModel
from mama.precision import autocast
from mama.tasks.retrieval.module import RetrievalModule


@torch.no_grad()
def encode_clipset(
    task: RetrievalModule,
    clips: ClipSet,
    num_frames: int,
    batch_size: int,
    precision: Precision = "fp32",
    workers: int = 0,
) -> tuple[Tensor, Tensor]:
    """All video embeddings (V, D) and all caption embeddings (C, D) of a clip set, in order.

    With several processes each rank encodes a contiguous share and the shares are gathered, so every
    item is encoded once and none is duplicated by padding.
    """
    task.eval()
    model = cast(VideoTextModel, task.model)
    device = next(task.parameters()).device
    video_share = shard_range(len(clips))
    caption_share = shard_range(len(clips.caption_ids))
    videos, texts = [], []
    with autocast(device, precision):
        for video in clips.eval_video_batches(batch_size, num_frames, video_share, workers):
            videos.append(model.encode_video(video.to(device)).float())
        for start in range(caption_share.start, caption_share.stop, batch_size):
            stop = min(start + batch_size, caption_share.stop)
            ids = clips.caption_ids[start:stop].to(device)
            mask = clips.caption_mask[start:stop].to(device)
            texts.append(model.encode_text(ids, mask).float())
    if not videos or not texts:  # a rank with an empty share still joins the gather, with 0 rows
        dim = model.encode_text(clips.caption_ids[:1].to(device), clips.caption_mask[:1].to(device)).shape[1]
        videos, texts = videos or [torch.zeros(0, dim, device=device)], texts or [torch.zeros(0, dim, device=device)]
    return gather_rows(torch.cat(videos)), gather_rows(torch.cat(texts))


def evaluate(task: RetrievalModule, clips: ClipSet, cfg: Config) -> dict[str, float]:
    """Retrieval metrics of both directions on a clip set, plus t2v R@1 per concept bucket."""
    video_emb, text_emb = encode_clipset(
        task, clips, cfg.data.num_frames, cfg.eval.batch_size, cfg.train.precision, cfg.data.workers
    )
    t2v_ranks, v2t_ranks = retrieval_ranks(text_emb, video_emb, clips.caption_video, chunk_size=cfg.eval.chunk_size)
    metrics = metrics_from_ranks(t2v_ranks, v2t_ranks)
    if cfg.eval.dsl:
        # Labelled dsl_*: re-normalised with statistics of the whole query set (see EvalConfig.dsl).
        metrics.update(dsl_metrics(text_emb, video_emb, clips.caption_video, chunk_size=cfg.eval.chunk_size))
    buckets = [clips.records[v].meta.get("bucket") for v in clips.caption_video.tolist()]
    if all(b is not None for b in buckets):
        for bucket, value in bucket_recall(t2v_ranks, buckets, k=1).items():
            metrics[f"{bucket}_t2v_r1"] = value
    metrics["num_videos"] = float(len(clips))
    metrics["num_queries"] = float(len(text_emb))
    return metrics
