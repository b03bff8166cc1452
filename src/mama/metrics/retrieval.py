"""Text-video retrieval metrics (R@k, median rank, mean rank) computed in chunks.

Shapes used throughout: ``Q`` captions (every caption is a query), ``V`` videos, ``d`` embedding
width. Several captions may describe the same video; ``text_to_video[q]`` is the index of caption
``q``'s video. In either direction the *queries* are the rows being ranked (captions for t2v, videos
for v2t) and the *candidates* are what they rank (``N`` of them: ``V`` for t2v, ``Q`` for v2t).

Raw similarities on the CPU (the common case) are ranked in **one pass**: each ``(c, w)`` tile of
the caption x video product (``c = chunk_size`` caption rows, ``w = _COLUMN_TILE`` videos) is
computed once, in float32, and counted for both directions; a tile's entries that lie too close to
a threshold for float32 to decide are re-scored with the float64 numerics below
(:func:`_one_pass_ranks`), so the ranks are those of the two-pass path. Peak memory beyond the
inputs is about ``8·c·w`` bytes per worker thread (float32 tile + four bool masks; 32 MiB at the
defaults) plus ``O(Q + V)`` vectors, whatever ``Q`` and ``V``. Measured (``benchmarks/ranking.py``,
2 threads on 2 busy shared cores, d = 512): at 10k x 10k 1.6 s, 1.19x the bare float32 products
of the same tiles on the same worker threads and 1.0x a dense ``text @ video.T`` (medians of 3),
where the two-pass path took 11.0 s; at 100k x 100k 172 s, 1.15x those bare products (one run).

The two-pass path (DSL, other devices, reduced-precision float32 matmul modes) ranks each direction
separately: the scores of one chunk of ``c`` query rows against all ``N`` candidates are kept
(``4·c·N`` bytes; ``8·c·N`` with DSL, whose scores need float64's exponent range); everything else
is computed in column tiles of ``w`` candidates. Peak memory beyond the inputs is about
``4·c·N + 12·c·w + 8·w·d`` bytes (float32 scores + float64 product tile and its float32 copy +
float64 candidate tile), and ``8·c·N + 20·c·w + 8·w·d`` with DSL; never a ``(Q, V)`` matrix, nor a
full-width float64 product, own-caption mask or int64 count. With the default ``c = 1024`` that is
~0.47 GB (raw) for N = 100,000. Measured process RSS is higher by ~0.1-0.3 GB: glibc's dynamic mmap
threshold keeps the freed tile-sized blocks on the heap (``MALLOC_MMAP_THRESHOLD_=1000000`` brings
the measured peak down to the formula). Counting uses ``count_nonzero``: ``mask.sum(dim)`` would
allocate an int64 copy of the mask, 8 bytes per similarity.

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
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
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


# --- One pass over float32 tiles (raw similarities on CPU) -------------------------------------------

_UNIT_ROUNDOFF32 = 2.0**-24
_SUBNORMAL_STEP = 2.0**-149  # float32's smallest step: absolute rounding error of underflowing values
_EXACT_BATCH = 2048  # band entries re-scored at once in float64: (2048, d) float64 temporaries
_COMPARE_ROWS = 32  # tile rows compared at once: 32 x 4096 float32 = 512 KiB, within a core's L2


def _one_pass_supported(text_emb: Tensor, video_emb: Tensor) -> bool:
    """The float32 error bound of :func:`_one_pass_ranks` assumes IEEE float32 products on the CPU:
    reduced-precision matmul modes (TF32, bf16), non-finite inputs and magnitudes whose float32
    products could overflow take the exact two-pass path."""
    dim = text_emb.shape[1]
    if not (
        text_emb.device.type == "cpu"
        and video_emb.device.type == "cpu"
        and torch.get_float32_matmul_precision() == "highest"
        and (dim + 4) * _UNIT_ROUNDOFF32 < 0.01
    ):
        return False
    text_max, video_max = _max_abs(text_emb), _max_abs(video_emb)
    return math.isfinite(text_max) and math.isfinite(video_max) and text_max * video_max * dim < 2.0**100


def _max_abs(x: Tensor) -> float:
    """``max |x|`` (NaN if any entry is NaN); in numpy where it can, which was 5x faster here."""
    if x.dtype in (torch.float32, torch.float64):
        values = x.numpy()
        return max(float(values.max()), -float(values.min()))  # NaN propagates through both
    return float(x.abs().max())


def _exact_scores(text_emb: Tensor, video_emb: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``(n,)`` float32 similarities of the pairs ``(rows[i], cols[i])``, accumulated in float64 and
    rounded once, the numerics of :func:`_similarity`. Gathers, products and sums run in numpy:
    in torch they took 15x longer here (2 threads, 10k pairs of d = 512)."""

    def gather64(emb: Tensor, index: Tensor) -> np.ndarray:
        if emb.dtype in (torch.float32, torch.float64):  # numpy has no bfloat16
            return emb.numpy()[index.numpy()].astype(np.float64, copy=False)
        return emb[index].to(torch.float64).numpy()

    out = np.empty(rows.shape[0], dtype=np.float32)
    for start in range(0, rows.shape[0], _EXACT_BATCH):
        r, c = rows[start : start + _EXACT_BATCH], cols[start : start + _EXACT_BATCH]
        out[start : start + _EXACT_BATCH] = np.einsum("ij,ij->i", gather64(text_emb, r), gather64(video_emb, c))
    return torch.from_numpy(out)


def _outward_float32(value64: Tensor, direction: float) -> np.ndarray:
    """float64 thresholds -> float32, rounded away from the threshold they bound (down for a lower
    bound, ``direction=-inf``; up for an upper bound, ``+inf``), so the band never shrinks."""
    value32 = value64.to(torch.float32)
    inward = value32.to(torch.float64) > value64 if direction < 0 else value32.to(torch.float64) < value64
    return torch.where(inward, torch.nextafter(value32, torch.full_like(value32, direction)), value32).numpy()


def _count_rows(mask: np.ndarray) -> np.ndarray:
    """``(c, w)`` bool -> ``(c,)`` int64 number of True per row. Eight flags are summed per uint64
    lane (at most 128 at a time, so no byte overflows into its neighbour): 1/8 of the additions of
    a plain ``mask.sum(1)``, which would otherwise cost about a third of the comparisons."""
    rows, width = mask.shape
    if width % 1024:
        return np.count_nonzero(mask, axis=1)
    lanes = mask.view(np.uint64).reshape(rows, -1, 128).sum(2)  # (c, w/1024) uint64, bytes <= 128
    return lanes.view(np.uint8).reshape(rows, -1).sum(1, dtype=np.int64)


def _count_cols(mask: np.ndarray) -> np.ndarray:
    """``(c, w)`` bool -> ``(w,)`` int64 number of True per column, summing uint64 lanes of eight
    flags over at most 255 rows at a time (no byte overflows)."""
    rows, width = mask.shape
    if width % 8:
        return np.count_nonzero(mask, axis=0)
    lanes = mask.view(np.uint64)  # (c, w/8)
    counts = np.zeros(width, dtype=np.int64)
    for start in range(0, rows, 255):
        counts += lanes[start : start + 255].sum(0).view(np.uint8)  # (w,)
    return counts


def _one_pass_ranks(
    text_emb: Tensor, video_emb: Tensor, text_to_video: Tensor, row_tile: int, column_tile: int
) -> tuple[Tensor, Tensor]:
    """Raw t2v and v2t ranks (the rules of :func:`retrieval_ranks`) from one float32 product tile
    per (caption rows, video columns) block, each tile counted in both directions.

    A float32 product ``z`` differs from the float64-accumulated similarity ``x`` by at most
    ``γ·‖t‖·‖v‖`` with ``γ = (d+4)u/(1-(d+4)u)``, ``u = 2^-24`` (Higham, *Accuracy and Stability of
    Numerical Algorithms*, 2nd ed., eq. 3.5, for any summation order; +2 for rounding float64 inputs
    to float32, +1 more for the float64 accumulation's own error). The threshold ``s`` of a query (its best own score, exact: float64 then float32)
    gets a band ``s ± m`` with ``m`` = that bound + half a float32 ulp of ``s`` (rounding ``x`` to
    float32 may reach ``s`` from below) + an underflow term: ``z >= s + m`` surely counts,
    ``z < s - m`` surely does not, and only the few entries inside the band are re-scored exactly
    (float64, rounded to float32, as :func:`_similarity`). A tile with many of them (near-duplicate
    or collapsed embeddings) is re-scored whole in float64 instead, so memory stays bounded by the
    tile. The own entries ``(q, text_to_video[q])`` are the same set in both directions and are
    excluded by setting them to ``-inf``.

    Row blocks are shared out to ``torch.get_num_threads()`` worker threads that run torch with
    one thread each (restored afterwards). Memory beyond the inputs, per worker: ``4·r·w`` (float32
    tile) + ``4·r·w`` (four bool masks) bytes, plus ``12·r·w`` in a tile re-scored whole;
    ``(Q,)``/``(V,)`` vectors otherwise.
    """
    num_captions, dim = text_emb.shape
    num_videos = video_emb.shape[0]
    gamma = (dim + 4) * _UNIT_ROUNDOFF32 / (1 - (dim + 4) * _UNIT_ROUNDOFF32)
    text32, video32 = text_emb.to(torch.float32), video_emb.to(torch.float32)

    # Exact own scores (Q,) and their per-video maxima (V,): the thresholds of both directions.
    own = _exact_scores(text_emb, video_emb, torch.arange(num_captions), text_to_video)  # (Q,)
    best_own = torch.full((num_videos,), -math.inf, dtype=torch.float32)
    best_own.scatter_reduce_(0, text_to_video, own, reduce="amax")  # (V,)
    # Norms only size the band: float32 norms (relative error < (d+1)u) padded by 2^-10 are upper bounds.
    text_norm = torch.linalg.vector_norm(text32, dim=1).to(torch.float64) * (1 + 2**-10)  # (Q,)
    video_norm = torch.linalg.vector_norm(video32, dim=1).to(torch.float64) * (1 + 2**-10)  # (V,)

    # Underflow: every rounded input and product may be off by one subnormal step (scaled by the other
    # factor), and the threshold itself by one more.
    max_abs = _max_abs(text32) + _max_abs(video32)
    absolute = 4 * (dim + 4) * _SUBNORMAL_STEP * (1 + max_abs) ** 2

    def band(threshold: Tensor, norm: Tensor, other_max_norm: float) -> tuple[np.ndarray, np.ndarray]:
        thr64 = threshold.to(torch.float64)
        margin = gamma * norm * other_max_norm + thr64.abs() * _UNIT_ROUNDOFF32 * 2 + absolute
        return _outward_float32(thr64 - margin, -math.inf), _outward_float32(thr64 + margin, math.inf)

    t2v_lo, t2v_hi = band(own, text_norm, float(video_norm.max()))  # (Q,) each
    v2t_lo, v2t_hi = band(best_own, video_norm, float(text_norm.max()))  # (V,) each
    own_np, best_own_np, caption_video = own.numpy(), best_own.numpy(), text_to_video.numpy()

    # Work units are (row block, column tile) pairs handed out in order; each worker counts into its
    # own (Q,) and (V,) arrays, summed at the end.
    units = [(r0, c0) for r0 in range(0, num_captions, row_tile) for c0 in range(0, num_videos, column_tile)]
    workers = max(1, min(torch.get_num_threads(), len(units)))
    t2v_counts = [np.zeros(num_captions, dtype=np.int64) for _ in range(workers)]
    v2t_counts = [np.zeros(num_videos, dtype=np.int64) for _ in range(workers)]
    next_unit = iter(units)
    lock = threading.Lock()

    def work(worker: int) -> None:
        t2v_count, v2t_count = t2v_counts[worker], v2t_counts[worker]
        tile_buf = torch.empty(min(row_tile, num_captions) * min(column_tile, num_videos), dtype=torch.float32)
        mask_buf = np.empty(tile_buf.shape[0] * 4, dtype=np.bool_)
        while True:
            with lock:
                unit = next(next_unit, None)
            if unit is None:
                return
            r0, c0 = unit
            r1, c1 = min(r0 + row_tile, num_captions), min(c0 + column_tile, num_videos)
            rows = text32[r0:r1]
            shape = (r1 - r0, c1 - c0)
            sim = torch.matmul(rows, video32[c0:c1].T, out=tile_buf[: shape[0] * shape[1]].view(shape))  # (r, w)
            sim_np = sim.numpy()
            own_cols = caption_video[r0:r1] - c0  # (r,)
            own_rows = np.flatnonzero((own_cols >= 0) & (own_cols < shape[1]))
            sim_np[own_rows, own_cols[own_rows]] = -np.inf

            size = sim_np.size
            t2v_lo_mask, t2v_hi_mask, v2t_lo_mask, v2t_hi_mask = (
                mask_buf[i * size : (i + 1) * size].reshape(shape) for i in range(4)
            )
            # t2v: each caption row against its own video's score; v2t: each video column against
            # its best own caption's score. Same tile, read once per direction and bound.
            # In slabs of rows that stay in cache through the four comparisons: the tile is read
            # from memory once, not four times.
            for s0 in range(0, shape[0], _COMPARE_ROWS):
                s1, q0, q1 = min(s0 + _COMPARE_ROWS, shape[0]), r0 + s0, min(r0 + s0 + _COMPARE_ROWS, r1)
                slab = sim_np[s0:s1]
                np.greater_equal(slab, t2v_lo[q0:q1, None], out=t2v_lo_mask[s0:s1])
                np.greater_equal(slab, t2v_hi[q0:q1, None], out=t2v_hi_mask[s0:s1])
                np.greater_equal(slab, v2t_lo[None, c0:c1], out=v2t_lo_mask[s0:s1])
                np.greater_equal(slab, v2t_hi[None, c0:c1], out=v2t_hi_mask[s0:s1])
            t2v_sure, v2t_sure = _count_rows(t2v_hi_mask), _count_cols(v2t_hi_mask)
            t2v_band = _count_rows(t2v_lo_mask) - t2v_sure  # (r,) entries left to re-score exactly
            v2t_band = _count_cols(v2t_lo_mask) - v2t_sure  # (w,)

            if (int(t2v_band.sum()) + int(v2t_band.sum())) * 8 > size:  # cheaper to redo the tile in float64
                exact = _similarity(text_emb[r0:r1].to(torch.float64), video_emb[c0:c1]).numpy()  # (r, w)
                exact[own_rows, own_cols[own_rows]] = -np.inf
                t2v_count[r0:r1] += np.count_nonzero(exact >= own_np[r0:r1, None], axis=1)
                v2t_count[c0:c1] += np.count_nonzero(exact >= best_own_np[None, c0:c1], axis=0)
                continue
            t2v_count[r0:r1] += t2v_sure
            v2t_count[c0:c1] += v2t_sure
            band_rows = np.flatnonzero(t2v_band)
            if band_rows.size:
                flat = np.flatnonzero(t2v_lo_mask[band_rows] ^ t2v_hi_mask[band_rows])
                local_rows, cols = band_rows[flat // shape[1]], flat % shape[1]
                q, v = torch.from_numpy(local_rows + r0), torch.from_numpy(cols + c0)
                hits = (_exact_scores(text_emb, video_emb, q, v) >= own[q]).numpy()
                t2v_count[r0:r1] += np.bincount(local_rows[hits], minlength=shape[0])
            band_cols = np.flatnonzero(v2t_band)
            if band_cols.size:
                flat = np.flatnonzero(v2t_lo_mask[:, band_cols] ^ v2t_hi_mask[:, band_cols])
                local_rows, cols = flat // band_cols.size, band_cols[flat % band_cols.size]
                q, v = torch.from_numpy(local_rows + r0), torch.from_numpy(cols + c0)
                hits = (_exact_scores(text_emb, video_emb, q, v) >= best_own[v]).numpy()
                v2t_count[c0:c1] += np.bincount(cols[hits], minlength=shape[1])

    if workers == 1:
        work(0)
    else:
        # One torch thread per worker, each on whole tiles: the threshold passes (numpy) then run on
        # every core, and no OpenMP team spins idle beside them between products (with 2 threads
        # on 2 cores, the default spin-wait made the numpy passes cost as much as the products).
        threads = torch.get_num_threads()

        def single_threaded(worker: int) -> None:
            torch.set_num_threads(1)
            try:
                work(worker)
            finally:
                torch.set_num_threads(threads)

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(single_threaded, range(workers)))
    return torch.from_numpy(1 + np.sum(t2v_counts, axis=0)), torch.from_numpy(1 + np.sum(v2t_counts, axis=0))


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
        chunk_size: caption rows (query rows on the two-pass path) scored at once; results do not
            depend on it. Peak memory beyond the inputs is ``8·chunk_size·4096`` bytes per torch
            thread for raw ranking on the CPU (one pass); on the two-pass path (DSL, other
            devices) about ``4·chunk_size·max(Q, V)`` bytes (``8·`` with DSL) plus a per-tile
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
    text_to_video = text_to_video.to(device=text_emb.device, dtype=torch.long)
    if not dsl and _one_pass_supported(text_emb, video_emb):
        return _one_pass_ranks(text_emb, video_emb, text_to_video, chunk_size, _COLUMN_TILE)
    return _two_pass_ranks(text_emb, video_emb, text_to_video, chunk_size, dsl=dsl, dsl_temperature=dsl_temperature)


def _two_pass_ranks(
    text_emb: Tensor,
    video_emb: Tensor,
    text_to_video: Tensor,
    chunk_size: int,
    *,
    dsl: bool = False,
    dsl_temperature: float = 100.0,
) -> tuple[Tensor, Tensor]:
    """:func:`retrieval_ranks` by :func:`_ranks` once per direction, float64 products: the path for
    DSL, other devices and reduced-precision float32 matmul (and the reference the one pass is
    benchmarked and tested against)."""
    device = text_emb.device
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
