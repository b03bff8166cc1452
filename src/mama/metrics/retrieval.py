"""Text-video retrieval metrics (R@k, median rank, mean rank) computed in chunks.

Shapes used throughout: ``Q`` captions (every caption is a query), ``V`` videos, ``d`` embedding
width. Several captions may describe the same video; ``text_to_video[q]`` is the index of caption
``q``'s video. In either direction the *queries* are the rows being ranked (captions for t2v, videos
for v2t) and the *candidates* are what they rank (``N`` of them: ``V`` for t2v, ``Q`` for v2t).

Memory: the scores of one chunk of ``c`` query rows against all ``N`` candidates are kept
(``4·c·N`` bytes; ``8·c·N`` with DSL, whose scores need float64's exponent range); everything else
is computed in column tiles of ``w = _COLUMN_TILE`` candidates. Peak memory beyond the inputs is
about ``4·c·N + 12·c·w + 8·w·d`` bytes (float32 scores + float64 product tile and its float32 copy
+ float64 candidate tile), and ``8·c·N + 20·c·w + 8·w·d`` with DSL; never a ``(Q, V)`` matrix, nor
a full-width float64 product, own-caption mask or int64 count. With the default ``c = 1024`` that
is ~0.47 GB (raw) for N = 100,000. Measured process RSS is higher by ~0.1-0.3 GB: glibc's dynamic
mmap threshold keeps the freed tile-sized blocks on the heap (``MALLOC_MMAP_THRESHOLD_=1000000``
brings the measured peak down to the formula). Counting uses ``count_nonzero``: ``mask.sum(dim)``
would allocate an int64 copy of the mask, 8 bytes per similarity.

Numerics: a BLAS matmul does not give bit-identical results for different batch shapes (on MKL a
float32 ``a @ b.T`` differs in the last bit from the same rows computed in another chunk, and even
two identical columns inside one product can differ). Ranks compare similarities exactly, so that
noise would make the result depend on ``chunk_size`` and would break ties between duplicate
embeddings at random. We therefore accumulate the dot products in float64 and round them to
float32 before comparing: the float64 noise (~1e-16) is far below a float32 ulp (~1e-8), so the
rounded values, and hence the ranks, equal those of a dense computation whatever the chunking.
Similarities are thus compared at float32 resolution, for float64 inputs too.

Tie rule (pessimistic): a candidate tied with the correct one counts *against* it. The t2v rank of
caption ``q`` is 1 + #(other videos with similarity >= that of ``q``'s video); the v2t rank of video
``v`` (multi-caption protocol: its best caption counts) is 1 + #(captions of *other* videos with
similarity >= the best similarity among ``v``'s own captions). A collapsed model whose embeddings
are all equal therefore gets the worst ranks (``V`` for t2v, ``Q - captions(v) + 1`` for v2t), not
R@1 = 100%.

DSL (dual softmax, opt-in) as in the authors' CLIP-ViP evaluation: the similarity matrix ``S``
(captions x videos) is re-weighted once by a softmax over the *captions*, computed over the whole
caption set, ``S'(q, v) = S(q, v) · softmax_q(T · S(:, v))[q]`` (their ``sim * softmax(100 · sim,
axis=0)``), and both directions rank that same matrix: t2v its rows, v2t its transpose (MAMA's
``text_video_retrieval/src/tasks/run_video_retrieval.py``, after microsoft/XPretrain CLIP-ViP). For v2t
the prior is therefore over the text queries, not over videos: within a video's row every score is
divided by the same normaliser, so v2t DSL ranks captions by ``S · exp(T·S)``, which orders like
``S`` wherever ``S > -1/T``. Two passes: the per-video log-sum-exp over all captions is streamed
first, then the re-weighted rows are ranked with the same tie rule. ``S'`` is computed in float64
from the float32-rounded ``S`` and then rounded to float32's 24-bit significand while keeping
float64's exponent range: the rounding removes the reduction-order noise (as above), and the wide
exponent keeps tiny weights (``exp(-200)`` at ``T = 100``) from underflowing to zero and creating
spurious ties.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["bucket_recall", "dsl_metrics", "metrics_from_ranks", "retrieval_metrics", "retrieval_ranks"]

RECALL_KS = (1, 5, 10)

# Candidates per float64 product tile: bounds the float64 temporaries to ~8·chunk·_COLUMN_TILE bytes
# however many candidates there are, while keeping each matmul large enough to run at full speed.
_COLUMN_TILE = 4096

_SIGNIFICAND_DROP = 52 - 23  # float64 significand bits that float32 does not have


def _similarity(rows64: Tensor, cols: Tensor) -> Tensor:
    """Dot products ``(R, d) float64 x (C, d) -> (R, C)`` float32, accumulated in float64 (see module doc)."""
    return (rows64 @ cols.to(torch.float64).T).to(torch.float32)


def _round_significand_(x: Tensor) -> Tensor:
    """Round float64 ``x`` in place to float32's 24-bit significand (round half to even, as a cast
    to float32 does), keeping float64's exponent range so that tiny values do not flush to zero."""
    bits = x.view(torch.int64)  # sign-magnitude: integer arithmetic on the low bits rounds |x|
    carry = bits >> _SIGNIFICAND_DROP  # one temporary, the rest in place
    carry &= 1  # lowest kept bit: a tie rounds up only if it is odd
    carry += (1 << (_SIGNIFICAND_DROP - 1)) - 1
    bits += carry  # a carry out of the significand bumps the exponent, which is the correct result
    bits &= -(1 << _SIGNIFICAND_DROP)
    return x


def _dsl_scores(sim: Tensor, video_lse: Tensor, temperature: float) -> Tensor:
    """``(c, w)`` float32 similarities -> float64 DSL scores ``S · exp(T·S - lse_video)`` (module doc).

    ``video_lse`` broadcasts against ``sim``: ``(w,)`` when the columns are videos (t2v), ``(c, 1)``
    when the rows are (v2t ranks the transpose of the same matrix).
    """
    sim64 = sim.to(torch.float64)
    weight = torch.mul(sim64, temperature)  # (c, w); in-place steps keep one float64 temporary
    weight -= video_lse  # softmax over all captions of each video
    sim64 *= weight.exp_()
    del weight
    return _round_significand_(sim64)


def _dsl_normalisers(text_emb: Tensor, video_emb: Tensor, chunk_size: int, temperature: float) -> Tensor:
    """``(V,)`` float64 log-sum-exp of ``T · S`` over all captions of each video's column, in one pass
    over caption rows: the one normaliser of DSL, shared by both directions."""
    num_captions, num_videos = text_emb.shape[0], video_emb.shape[0]
    video_lse = torch.full((num_videos,), -math.inf, dtype=torch.float64, device=text_emb.device)
    for start in range(0, num_captions, chunk_size):
        rows64 = text_emb[start : start + chunk_size].to(torch.float64)
        for col in range(0, num_videos, _COLUMN_TILE):
            sim = _similarity(rows64, video_emb[col : col + _COLUMN_TILE])  # (c, w)
            logits = temperature * sim.to(torch.float64)  # from the float32-rounded S, as _dsl_scores
            tile_videos = video_lse[col : col + _COLUMN_TILE]  # a view: updated in place
            torch.logaddexp(tile_videos, torch.logsumexp(logits, dim=0), out=tile_videos)
    return video_lse


def _ranks(
    query_emb: Tensor,
    cand_emb: Tensor,
    own_offsets: Tensor,
    own_cands: Tensor,
    chunk_size: int,
    video_lse: Tensor | None,
    temperature: float,
    videos_are_queries: bool,
) -> Tensor:
    """The one ranking core behind both directions, raw or DSL.

    Query ``i``'s correct candidates are ``own_cands[own_offsets[i]:own_offsets[i + 1]]`` (CSR:
    ``own_offsets`` is ``(queries + 1,)``, at least one candidate each). Rank = 1 + #(candidates
    that are not its own with score >= its best own score). ``video_lse``: ``(V,)`` DSL
    normalisers, or None for raw similarities; ``videos_are_queries`` says which axis they index
    (the candidates for t2v, the query rows for v2t). Returns ``(queries,)`` int64 on CPU.
    """
    num_queries, num_cands = query_emb.shape[0], cand_emb.shape[0]
    device = query_emb.device
    score_dtype = torch.float32 if video_lse is None else torch.float64
    ranks = []
    for start in range(0, num_queries, chunk_size):
        stop = min(start + chunk_size, num_queries)
        rows64 = query_emb[start:stop].to(torch.float64)
        scores = torch.empty(stop - start, num_cands, dtype=score_dtype, device=device)  # (c, N)
        for col in range(0, num_cands, _COLUMN_TILE):
            sim = _similarity(rows64, cand_emb[col : col + _COLUMN_TILE])  # (c, w)
            if video_lse is not None:
                lse = video_lse[start:stop, None] if videos_are_queries else video_lse[col : col + _COLUMN_TILE]
                sim = _dsl_scores(sim, lse, temperature)
            scores[:, col : col + sim.shape[1]] = sim

        # Own scores are gathered from the same matrix (never recomputed), so the best own candidate
        # is guaranteed to count as >= itself; no (c, N) own-candidate mask is needed.
        own_cols = own_cands[int(own_offsets[start]) : int(own_offsets[stop])]  # (n_own,)
        own_counts = own_offsets[start + 1 : stop + 1] - own_offsets[start:stop]  # (c,)
        own_rows = torch.repeat_interleave(torch.arange(stop - start, device=device), own_counts)  # (n_own,)
        own_scores = scores[own_rows, own_cols]  # (n_own,)
        best_own = torch.full((stop - start,), -math.inf, dtype=score_dtype, device=device)
        best_own.scatter_reduce_(0, own_rows, own_scores, reduce="amax")  # (c,)
        own_at_best = torch.zeros(stop - start, dtype=torch.long, device=device)
        own_at_best.index_add_(0, own_rows, (own_scores >= best_own[own_rows]).long())  # (c,)

        at_or_above = torch.zeros(stop - start, dtype=torch.long, device=device)
        for col in range(0, num_cands, _COLUMN_TILE):
            at_or_above += torch.count_nonzero(scores[:, col : col + _COLUMN_TILE] >= best_own[:, None], dim=1)
        ranks.append(1 + at_or_above - own_at_best)
    return torch.cat(ranks).cpu()


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
    text_emb: Tensor,
    video_emb: Tensor,
    text_to_video: Tensor,
    chunk_size: int = 1024,
    *,
    dsl: bool = False,
    dsl_temperature: float = 100.0,
) -> tuple[Tensor, Tensor]:
    """1-based retrieval ranks in both directions, ties counted against the correct item.

    Args:
        text_emb: ``(Q, d)`` L2-normalised caption embeddings; similarity is the dot product.
        video_emb: ``(V, d)`` L2-normalised video embeddings, on the same device.
        text_to_video: ``(Q,)`` integer index in ``[0, V)`` of each caption's video. Every video
            needs at least one caption (``ValueError`` otherwise).
        chunk_size: query rows scored at once; results do not depend on it. Peak memory beyond the
            inputs is about ``4·chunk_size·max(Q, V)`` bytes (``8·`` with DSL) plus a per-tile
            term independent of ``Q`` and ``V`` (~65 MB at the default; module doc).
        dsl: rank dual-softmax re-weighted similarities instead of raw ones, the authors' CLIP-ViP
            rule: one softmax over captions, v2t ranks the transpose (module doc); one extra pass
            over the similarities (for the per-video normalisers), so ~1.5x the time.
        dsl_temperature: inverse temperature ``T`` of the DSL softmax, applied to cosine
            similarities (100 matches CLIP's logit scale).

    Returns:
        ``t2v_ranks``: ``(Q,)`` int64 on CPU, rank of caption ``q``'s own video among all ``V``
        videos = 1 + #other videos with similarity >= the own video's.
        ``v2t_ranks``: ``(V,)`` int64 on CPU, for video ``v`` 1 + #captions of other videos with
        similarity >= that of ``v``'s most similar own caption (the multi-caption protocol: the
        best own caption counts, and ``v``'s other captions never push it down).
    """
    _check_inputs(text_emb, video_emb, text_to_video, chunk_size)
    if dsl and not (math.isfinite(dsl_temperature) and dsl_temperature > 0):
        raise ValueError(f"dsl_temperature must be finite and > 0, got {dsl_temperature}")
    text_emb, video_emb = text_emb.detach(), video_emb.detach()
    device = text_emb.device
    text_to_video = text_to_video.to(device=device, dtype=torch.long)
    num_captions, num_videos = text_emb.shape[0], video_emb.shape[0]

    # Own candidates as CSR: each caption owns one video; each video owns its captions.
    caption_offsets = torch.arange(num_captions + 1, device=device)
    video_captions = torch.argsort(text_to_video, stable=True)  # (Q,) caption ids grouped by video
    video_offsets = torch.zeros(num_videos + 1, dtype=torch.long, device=device)
    video_offsets[1:] = torch.cumsum(torch.bincount(text_to_video, minlength=num_videos), dim=0)

    video_lse = _dsl_normalisers(text_emb, video_emb, chunk_size, dsl_temperature) if dsl else None
    t2v = _ranks(text_emb, video_emb, caption_offsets, text_to_video, chunk_size, video_lse, dsl_temperature, False)
    # v2t ranks the transpose of the same re-weighted matrix (module doc).
    v2t = _ranks(video_emb, text_emb, video_offsets, video_captions, chunk_size, video_lse, dsl_temperature, True)
    return t2v, v2t


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


def dsl_metrics(
    text_emb: Tensor,
    video_emb: Tensor,
    text_to_video: Tensor,
    chunk_size: int = 1024,
    temperature: float = 100.0,
) -> dict[str, float]:
    """:func:`retrieval_metrics` of dual-softmax re-weighted similarities, keys prefixed ``dsl_``.

    DSL as in the authors' CLIP-ViP evaluation: one softmax over the captions re-weights the
    (captions x videos) similarities, t2v ranks that matrix and v2t its transpose (module doc).

    Args: as :func:`retrieval_ranks`; ``temperature`` is its ``dsl_temperature``.

    Returns:
        ``dsl_t2v_r1 ... dsl_v2t_mnr``: the :func:`retrieval_metrics` keys with a ``dsl_`` prefix, so
        they can be reported next to the raw ones.
    """
    ranks = retrieval_ranks(text_emb, video_emb, text_to_video, chunk_size, dsl=True, dsl_temperature=temperature)
    return {f"dsl_{key}": value for key, value in metrics_from_ranks(*ranks).items()}


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
    for label, hit in zip(query_buckets, hits, strict=True):
        counts = hit_counts.setdefault(label, [0, 0])
        counts[0] += int(hit)
        counts[1] += 1
    return {label: 100.0 * num_hits / num_queries for label, (num_hits, num_queries) in hit_counts.items()}
