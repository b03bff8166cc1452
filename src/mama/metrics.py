"""Text-video retrieval metrics (R@k, median rank, mean rank) computed in chunks.

Shapes used throughout: ``Q`` captions (every caption is a query), ``V`` videos, ``d`` embedding
width. Several captions may describe the same video; ``text_to_video[q]`` is the index of caption
``q``'s video.

Similarities are computed one chunk of rows at a time, so peak memory is about
``chunk_size * max(Q, V) * 13`` bytes instead of a full ``(Q, V)`` matrix.

Numerics: a BLAS matmul does not give bit-identical results for different batch shapes (on MKL a
float32 ``a @ b.T`` differs in the last bit from the same rows computed in another chunk, and even
two identical columns inside one product can differ). Ranks compare similarities exactly, so that
noise would make the result depend on ``chunk_size`` and would break ties between duplicate
embeddings at random. We therefore accumulate the dot products in float64 and round them to
float32 before comparing: the float64 noise (~1e-16) is far below a float32 ulp (~1e-8), so the
rounded values, and hence the ranks, equal those of a dense computation whatever the chunking.
Similarities are thus compared at float32 resolution, for float64 inputs too.

Tie rule (optimistic): a rank is 1 + the number of candidates with *strictly* higher similarity,
so candidates tied with the correct one do not push it down.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["bucket_recall", "metrics_from_ranks", "retrieval_metrics", "retrieval_ranks"]

RECALL_KS = (1, 5, 10)


def _similarity(rows: Tensor, cols: Tensor) -> Tensor:
    """Dot products ``(R, d) x (C, d) -> (R, C)`` float32, accumulated in float64 (see module doc)."""
    return (rows.to(torch.float64) @ cols.to(torch.float64).T).to(torch.float32)


def _check_inputs(text_emb: Tensor, video_emb: Tensor, text_to_video: Tensor, chunk_size: int) -> None:
    if text_emb.ndim != 2 or video_emb.ndim != 2:
        raise ValueError(f"expected 2-D embeddings, got text {tuple(text_emb.shape)}, video {tuple(video_emb.shape)}")
    if text_emb.shape[1] != video_emb.shape[1]:
        raise ValueError(f"embedding widths differ: text d={text_emb.shape[1]}, video d={video_emb.shape[1]}")
    num_captions, num_videos = text_emb.shape[0], video_emb.shape[0]
    if num_captions == 0 or num_videos == 0:
        raise ValueError(f"need at least one caption and one video, got Q={num_captions}, V={num_videos}")
    if text_to_video.shape != (num_captions,):
        raise ValueError(f"text_to_video must have shape (Q,)=({num_captions},), got {tuple(text_to_video.shape)}")
    if text_to_video.dtype.is_floating_point or text_to_video.dtype.is_complex or text_to_video.dtype == torch.bool:
        raise ValueError(f"text_to_video must be an integer tensor, got {text_to_video.dtype}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    low, high = int(text_to_video.min()), int(text_to_video.max())
    if low < 0 or high >= num_videos:
        raise ValueError(f"text_to_video values must lie in [0, {num_videos}), got range [{low}, {high}]")
    captions_per_video = torch.bincount(text_to_video.cpu(), minlength=num_videos)
    uncaptioned = torch.nonzero(captions_per_video == 0).flatten()
    if uncaptioned.numel() > 0:
        # A video without captions has no correct answer for v2t, so any rank for it would be made up.
        raise ValueError(f"{uncaptioned.numel()} video(s) have no caption, e.g. indices {uncaptioned[:10].tolist()}")


@torch.no_grad()
def retrieval_ranks(
    text_emb: Tensor, video_emb: Tensor, text_to_video: Tensor, chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """1-based retrieval ranks in both directions.

    Args:
        text_emb: ``(Q, d)`` L2-normalised caption embeddings; similarity is the dot product.
        video_emb: ``(V, d)`` L2-normalised video embeddings, on the same device.
        text_to_video: ``(Q,)`` integer index in ``[0, V)`` of each caption's video. Every video
            needs at least one caption (``ValueError`` otherwise).
        chunk_size: rows of the similarity matrix computed at once; results do not depend on it.

    Returns:
        ``t2v_ranks``: ``(Q,)`` int64 on CPU, rank of caption ``q``'s own video among all ``V``
        videos = 1 + #videos with strictly higher similarity.
        ``v2t_ranks``: ``(V,)`` int64 on CPU, for video ``v`` the best (minimum) rank over its own
        captions among all ``Q`` captions, a caption's rank being 1 + #captions with strictly higher
        similarity to ``v`` (the standard multi-caption protocol).
    """
    _check_inputs(text_emb, video_emb, text_to_video, chunk_size)
    text_emb, video_emb = text_emb.detach(), video_emb.detach()
    text_to_video = text_to_video.to(device=text_emb.device, dtype=torch.long)
    num_captions, num_videos = text_emb.shape[0], video_emb.shape[0]

    t2v_chunks = []
    for start in range(0, num_captions, chunk_size):
        sim = _similarity(text_emb[start : start + chunk_size], video_emb)  # (c, V)
        # Taking the own similarity from the same matrix guarantees the own video never counts as
        # strictly higher than itself.
        own_sim = sim.gather(1, text_to_video[start : start + chunk_size, None])  # (c, 1)
        t2v_chunks.append((sim > own_sim).sum(dim=1) + 1)

    v2t_chunks = []
    video_to_text = text_to_video.to(video_emb.device)
    for start in range(0, num_videos, chunk_size):
        sim = _similarity(video_emb[start : start + chunk_size], text_emb)  # (c, Q)
        video_idx = torch.arange(start, start + sim.shape[0], device=sim.device)
        is_own_caption = video_to_text[None, :] == video_idx[:, None]  # (c, Q)
        # Rank falls as similarity rises, so the best rank over a video's captions is the rank of
        # its most similar caption; no need to rank every caption.
        best_own_sim = sim.masked_fill(~is_own_caption, float("-inf")).amax(dim=1, keepdim=True)  # (c, 1)
        v2t_chunks.append((sim > best_own_sim).sum(dim=1) + 1)

    return torch.cat(t2v_chunks).cpu(), torch.cat(v2t_chunks).cpu()


def _rank_summary(ranks: Tensor, prefix: str) -> dict[str, float]:
    """R@1/5/10 in percent, median rank and mean rank of 1-based ``ranks`` ``(N,)``."""
    ranks_f = ranks.to(torch.float64)
    summary = {f"{prefix}_r{k}": 100.0 * float((ranks <= k).to(torch.float64).mean()) for k in RECALL_KS}
    # torch.median returns the lower middle value for even N; the literature (CLIP4Clip and
    # successors use np.median) averages the two middle values, so we do too.
    sorted_ranks, _ = torch.sort(ranks_f)
    middle = (sorted_ranks.numel() - 1) / 2
    summary[f"{prefix}_mdr"] = float((sorted_ranks[int(middle)] + sorted_ranks[int(middle + 0.5)]) / 2)
    summary[f"{prefix}_mnr"] = float(ranks_f.mean())
    return summary


def retrieval_metrics(
    text_emb: Tensor, video_emb: Tensor, text_to_video: Tensor, chunk_size: int = 1024
) -> dict[str, float]:
    """Text-to-video and video-to-text retrieval metrics.

    Args: as :func:`retrieval_ranks`.

    Returns:
        ``t2v_r1 t2v_r5 t2v_r10 v2t_r1 v2t_r5 v2t_r10``: recall@k in percent (0..100);
        ``t2v_mdr v2t_mdr``: median rank (1-based; mean of the two middle ranks when the count is
        even); ``t2v_mnr v2t_mnr``: mean rank (1-based). t2v averages over the ``Q`` captions, v2t
        over the ``V`` videos.
    """
    return metrics_from_ranks(*retrieval_ranks(text_emb, video_emb, text_to_video, chunk_size))


def metrics_from_ranks(t2v_ranks: Tensor, v2t_ranks: Tensor) -> dict[str, float]:
    """The :func:`retrieval_metrics` dict from ranks already computed by :func:`retrieval_ranks`.

    Lets a caller that also needs the per-query ranks (e.g. for :func:`bucket_recall`) compute the
    similarities once.
    """
    return {**_rank_summary(t2v_ranks, "t2v"), **_rank_summary(v2t_ranks, "v2t")}


def bucket_recall(t2v_ranks: Tensor, query_buckets: Sequence[str], k: int = 1) -> dict[str, float]:
    """Text-to-video recall@k in percent, separately for each bucket of queries.

    Args:
        t2v_ranks: ``(Q,)`` 1-based ranks from :func:`retrieval_ranks`.
        query_buckets: ``Q`` labels (e.g. "head", "mid", "tail"), one per caption.
        k: recall cut-off.

    Returns:
        ``{label: R@k}`` for every label present, in order of first appearance.
    """
    if t2v_ranks.ndim != 1 or t2v_ranks.shape[0] != len(query_buckets):
        raise ValueError(f"need one label per query: ranks {tuple(t2v_ranks.shape)}, {len(query_buckets)} labels")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    hits = (t2v_ranks.cpu() <= k).tolist()
    hit_counts: dict[str, list[int]] = {}  # label -> [hits, queries]
    for label, hit in zip(query_buckets, hits):
        counts = hit_counts.setdefault(label, [0, 0])
        counts[0] += int(hit)
        counts[1] += 1
    return {label: 100.0 * num_hits / num_queries for label, (num_hits, num_queries) in hit_counts.items()}
