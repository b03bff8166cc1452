"""The one-pass ranking (raw similarities on the CPU) against brute force and the two-pass path."""

import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mama.metrics.retrieval
from mama.metrics.retrieval import _one_pass_ranks, _two_pass_ranks, retrieval_ranks


def _problem(num_videos: int, max_captions: int, dim: int, seed: int):
    """Unit embeddings, 1..max_captions captions per video in shuffled order, captions near their video."""
    gen = torch.Generator().manual_seed(seed)
    captions_per_video = torch.randint(1, max_captions + 1, (num_videos,), generator=gen)
    text_to_video = torch.repeat_interleave(torch.arange(num_videos), captions_per_video)
    text_to_video = text_to_video[torch.randperm(len(text_to_video), generator=gen)]
    video_emb = F.normalize(torch.randn(num_videos, dim, generator=gen), dim=1)
    text_emb = F.normalize(video_emb[text_to_video] + 0.9 * torch.randn(len(text_to_video), dim, generator=gen), dim=1)
    return text_emb, video_emb, text_to_video


def _brute_force(text_emb, video_emb, text_to_video):
    """The rule written out on the full (Q, V) matrix: float64 products rounded to float32, a tie
    counts against the correct item, v2t uses each video's best own caption."""
    sim = (text_emb.double() @ video_emb.double().T).float()  # (Q, V)
    num_videos = video_emb.shape[0]
    own = sim[torch.arange(len(sim)), text_to_video]  # (Q,)
    is_own = text_to_video[:, None] == torch.arange(num_videos)[None, :]  # (Q, V)
    t2v = 1 + ((sim >= own[:, None]) & ~is_own).sum(1)
    best_own = torch.full((num_videos,), -torch.inf).scatter_reduce(0, text_to_video, own, reduce="amax")  # (V,)
    v2t = 1 + ((sim >= best_own[None, :]) & ~is_own).sum(0)
    return t2v, v2t


def _with_near_ties(text_emb, video_emb, text_to_video, seed: int = 0):
    """Make many similarities equal or a few float32 ulps from a correct item's: duplicate and
    ulp-perturbed videos, duplicate captions of other videos, and quantised rows."""
    gen = torch.Generator().manual_seed(seed)
    text_emb, video_emb = text_emb.clone(), video_emb.clone()
    num_videos = len(video_emb)
    for copy in range(1, num_videos, 7):  # exact duplicates and 1-ulp neighbours of video 0, 3, ...
        original = copy - 1
        video_emb[copy] = video_emb[original]
        if copy % 2:
            video_emb[copy, 0] = torch.nextafter(video_emb[copy, 0], torch.tensor(2.0))
    for copy in range(2, len(text_emb), 11):
        text_emb[copy] = text_emb[int(torch.randint(len(text_emb), (1,), generator=gen))]
    text_emb[::13] = (text_emb[::13] * 8).round() / 8
    video_emb[::5] = (video_emb[::5] * 8).round() / 8
    return text_emb, video_emb, text_to_video


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("near_ties", [False, True])
@pytest.mark.parametrize(("row_tile", "column_tile"), [(1, 5), (7, 8), (64, 1024), (1000, 4096)])
def test_one_pass_equals_brute_force(row_tile, column_tile, near_ties, dtype):
    # Tiny tiles on a small problem (many Python iterations); the packed counts need >= 1024 columns.
    num_videos = 60 if row_tile < 64 else 1100
    text_emb, video_emb, text_to_video = _problem(num_videos=num_videos, max_captions=3, dim=32, seed=1)
    if near_ties:
        text_emb, video_emb, text_to_video = _with_near_ties(text_emb, video_emb, text_to_video)
    text_emb, video_emb = text_emb.to(dtype), video_emb.to(dtype)
    ref_t2v, ref_v2t = _brute_force(text_emb, video_emb, text_to_video)
    t2v, v2t = _one_pass_ranks(text_emb, video_emb, text_to_video, row_tile, column_tile)
    assert t2v.dtype == torch.long and v2t.dtype == torch.long
    assert torch.equal(t2v, ref_t2v)
    assert torch.equal(v2t, ref_v2t)
    assert ref_t2v.max() > 1 and ref_v2t.max() > 1 and (ref_t2v == 1).any()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_one_pass_equals_two_pass_and_restores_threads(threads):
    text_emb, video_emb, text_to_video = _problem(num_videos=2500, max_captions=4, dim=256, seed=2)
    text_emb, video_emb, text_to_video = _with_near_ties(text_emb, video_emb, text_to_video, seed=3)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _one_pass_ranks(text_emb, video_emb, text_to_video, 256, 1024)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    ref = _two_pass_ranks(text_emb, video_emb, text_to_video, 300)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_raw_cpu_ranking_takes_the_one_pass(monkeypatch):
    text_emb, video_emb, text_to_video = _problem(num_videos=50, max_captions=3, dim=16, seed=4)
    expected = _brute_force(text_emb, video_emb, text_to_video)

    def refuse(*args, **kwargs):
        raise AssertionError("raw ranking on the CPU must not take the two-pass path")

    monkeypatch.setattr(mama.metrics.retrieval, "_two_pass_ranks", refuse)
    got = retrieval_ranks(text_emb, video_emb, text_to_video, chunk_size=16)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_reduced_precision_overflow_and_non_finite_inputs_take_the_exact_path(monkeypatch):
    text_emb, video_emb, _ = _problem(num_videos=40, max_captions=2, dim=16, seed=5)
    assert mama.metrics.retrieval._one_pass_supported(text_emb, video_emb)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "medium")
    assert not mama.metrics.retrieval._one_pass_supported(text_emb, video_emb)
    monkeypatch.undo()
    assert not mama.metrics.retrieval._one_pass_supported(text_emb.double() * 1e30, video_emb.double() * 1e30)
    text_emb[3, 0] = float("nan")
    assert not mama.metrics.retrieval._one_pass_supported(text_emb, video_emb)


def test_collapsed_tile_is_rescored_whole(monkeypatch):
    # All similarities equal: every entry lies in the band, so each tile is redone in float64.
    text_emb = F.normalize(torch.ones(30, 8), dim=1)
    video_emb = F.normalize(torch.ones(12, 8), dim=1)
    text_to_video = torch.arange(30) % 12
    calls = []
    similarity = mama.metrics.retrieval._similarity
    monkeypatch.setattr(mama.metrics.retrieval, "_similarity", lambda *a: calls.append(1) or similarity(*a))
    t2v, v2t = _one_pass_ranks(text_emb, video_emb, text_to_video, 8, 5)
    assert len(calls) == 4 * 3  # every (row block, column tile)
    assert torch.equal(t2v, torch.full((30,), 12))
    captions = torch.bincount(text_to_video, minlength=12)
    assert torch.equal(v2t, 30 - captions + 1)


def test_memory_is_bounded_by_the_tile(monkeypatch):
    # Q x V = 3300 x 3000 float32 would be ~40 MB; one (64, 256) tile is 64 KB.
    text_emb, video_emb, text_to_video = _problem(num_videos=3000, max_captions=2, dim=16, seed=6)
    products = []
    matmul = torch.matmul

    def spy(a, b, *, out=None):
        products.append(out.numel())
        return matmul(a, b, out=out)

    monkeypatch.setattr(torch, "matmul", spy)
    tracemalloc.start()  # numpy buffers (masks, counts) are traced; torch's are checked through the spy
    try:
        got = _one_pass_ranks(text_emb, video_emb, text_to_video, 64, 256)
        _, numpy_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert max(products) == 64 * 256
    tile_masks = 4 * 64 * 256
    count_vectors = 8 * (len(text_emb) + 3 * len(video_emb))  # t2v counts + per-worker v2t counts
    assert numpy_peak < tile_masks + count_vectors + 600_000, numpy_peak
    assert numpy_peak < len(text_emb) * len(video_emb) // 10
    ref = _brute_force(text_emb, video_emb, text_to_video)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_packed_counts_match_plain_counts():
    rng = np.random.default_rng(0)
    for rows, width in [(1, 1024), (300, 2048), (600, 8), (5, 13), (256, 1000)]:
        mask = rng.random((rows, width)) < 0.3
        mask[:, :3] = True  # full and empty runs as well
        mask[:, -2:] = False
        assert np.array_equal(mama.metrics.retrieval._count_rows(mask), mask.sum(1))
        assert np.array_equal(mama.metrics.retrieval._count_cols(mask), mask.sum(0))
    full = np.ones((600, 2048), dtype=bool)  # 255-row and 128-lane limits reached exactly
    assert np.array_equal(mama.metrics.retrieval._count_rows(full), full.sum(1))
    assert np.array_equal(mama.metrics.retrieval._count_cols(full), full.sum(0))
