import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mama.metrics.retrieval
from mama.metrics.retrieval import bucket_recall, dsl_metrics, metrics_from_ranks, retrieval_metrics, retrieval_ranks


def _random_problem(num_videos: int = 23, max_captions: int = 4, dim: int = 16, seed: int = 0):
    """Embeddings where each video has 1..max_captions captions, captions shuffled across videos."""
    gen = torch.Generator().manual_seed(seed)
    captions_per_video = torch.randint(1, max_captions + 1, (num_videos,), generator=gen)
    text_to_video = torch.repeat_interleave(torch.arange(num_videos), captions_per_video)
    text_to_video = text_to_video[torch.randperm(len(text_to_video), generator=gen)]
    video_emb = F.normalize(torch.randn(num_videos, dim, generator=gen), dim=1)
    # Captions near their video so ranks spread over 1..V rather than being uniform noise.
    text_emb = F.normalize(video_emb[text_to_video] + 0.9 * torch.randn(len(text_to_video), dim, generator=gen), dim=1)
    return text_emb, video_emb, text_to_video


def _tied_problem(kind: str, seed: int = 0):
    """A multi-caption problem with many exactly equal similarities of the given kind."""
    text_emb, video_emb, text_to_video = _random_problem(seed=seed)
    if kind == "duplicate_videos":  # videos 1 and 2 copy video 0, so their columns tie
        video_emb[1] = video_emb[2] = video_emb[0]
        video_emb[5] = video_emb[4]
    elif kind == "duplicate_captions":  # some captions copy captions of other videos
        for copy, original in ((1, 0), (2, 0), (7, 3), (9, 11), (12, 11)):
            text_emb[copy] = text_emb[original]
    elif kind == "quantised":  # entries in {-1, -0.5, 0, 0.5, 1}: few distinct, exact dot products
        text_emb = (text_emb[:, :4] * 4).round().clamp(-2, 2) / 2
        video_emb = (video_emb[:, :4] * 4).round().clamp(-2, 2) / 2
    else:
        assert kind == "random"
    return text_emb, video_emb, text_to_video


def _round_to_float32_significand(x: torch.Tensor) -> torch.Tensor:
    """float64 -> float32 precision with float64's exponent range (the library's rule for DSL scores)."""
    mantissa, exponent = torch.frexp(x)
    return torch.ldexp(mantissa.float().double(), exponent)


def _dense_reference(text_emb, video_emb, text_to_video, dsl_temperature=None):
    """Brute force from the full (Q, V) matrix with the pessimistic tie rule, optionally with DSL."""
    sim = (text_emb.double() @ video_emb.double().T).float().double()  # (Q, V), same numerics as the library
    t2v_score, v2t_score = sim, sim.T  # (Q, V), (V, Q): queries are rows
    if dsl_temperature is not None:  # the authors' rule: one softmax over the captions, v2t its transpose
        t2v_score = _round_to_float32_significand(sim * torch.softmax(dsl_temperature * sim, dim=0))
        v2t_score = t2v_score.T
    num_captions, num_videos = sim.shape
    t2v = []
    for q in range(num_captions):
        own = int(text_to_video[q])
        t2v.append(1 + sum(int(t2v_score[q, v] >= t2v_score[q, own]) for v in range(num_videos) if v != own))
    v2t = []
    for v in range(num_videos):
        own = [q for q in range(num_captions) if text_to_video[q] == v]
        best = max(float(v2t_score[v, q]) for q in own)
        v2t.append(1 + sum(int(v2t_score[v, q] >= best) for q in range(num_captions) if q not in own))
    return torch.tensor(t2v), torch.tensor(v2t)


def _reference_metrics(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    return {
        f"{prefix}_r1": 100 * np.mean(ranks <= 1),
        f"{prefix}_r5": 100 * np.mean(ranks <= 5),
        f"{prefix}_r10": 100 * np.mean(ranks <= 10),
        f"{prefix}_mdr": float(np.median(ranks)),
        f"{prefix}_mnr": float(np.mean(ranks)),
    }


@pytest.mark.parametrize("chunk_size", [1, 2, 7, 64, 1000])
def test_chunked_ranks_equal_dense_reference(chunk_size):
    text_emb, video_emb, text_to_video = _random_problem()
    assert len(text_emb) < 1000  # so the largest chunk size exceeds Q
    ref_t2v, ref_v2t = _dense_reference(text_emb, video_emb, text_to_video)
    t2v, v2t = retrieval_ranks(text_emb, video_emb, text_to_video, chunk_size=chunk_size)
    assert t2v.dtype == torch.long and v2t.dtype == torch.long
    assert torch.equal(t2v, ref_t2v)
    assert torch.equal(v2t, ref_v2t)
    assert ref_t2v.max() > 1 and ref_v2t.max() > 1  # the problem is not trivially perfect

    metrics = retrieval_metrics(text_emb, video_emb, text_to_video, chunk_size=chunk_size)
    expected = {**_reference_metrics(ref_t2v.numpy(), "t2v"), **_reference_metrics(ref_v2t.numpy(), "v2t")}
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("column_tile", [5, 4096])
@pytest.mark.parametrize("dsl", [False, True])
@pytest.mark.parametrize("kind", ["random", "duplicate_videos", "duplicate_captions", "quantised"])
def test_ranks_with_ties_equal_dense_reference(kind, dsl, column_tile, monkeypatch):
    # column_tile=5 makes every chunk span several column tiles, as at 100k candidates.
    monkeypatch.setattr(mama.metrics.retrieval, "_COLUMN_TILE", column_tile)
    text_emb, video_emb, text_to_video = _tied_problem(kind)
    # Quantised similarities reach |S| = 4; a lower T keeps exp(T·S - lse) inside float64 range.
    temperature = 30.0 if kind == "quantised" else 100.0
    ref_t2v, ref_v2t = _dense_reference(text_emb, video_emb, text_to_video, temperature if dsl else None)
    for chunk_size in (1, 7, 1000):
        t2v, v2t = retrieval_ranks(
            text_emb, video_emb, text_to_video, chunk_size=chunk_size, dsl=dsl, dsl_temperature=temperature
        )
        assert torch.equal(t2v, ref_t2v), chunk_size
        assert torch.equal(v2t, ref_v2t), chunk_size
    if kind != "random":  # the ties are real: some other candidate equals a correct item's similarity
        sim = text_emb.double() @ video_emb.double().T  # (Q, V)
        own_sim = sim.gather(1, text_to_video[:, None])  # (Q, 1)
        t2v_tied = ((sim == own_sim).sum(dim=1) > 1).any()
        best_own = torch.full((len(video_emb),), -math.inf, dtype=sim.dtype)
        best_own = best_own.scatter_reduce(0, text_to_video, own_sim.squeeze(1), reduce="amax")  # (V,)
        not_own = text_to_video[:, None] != torch.arange(len(video_emb))[None, :]  # (Q, V)
        v2t_tied = ((sim == best_own[None, :]) & not_own).any()
        assert t2v_tied or v2t_tied


def test_chunking_does_not_change_ranks_at_realistic_size():
    # At this size plain float32 MKL products differ in the last bit between chunk shapes; the
    # ranks must not.
    text_emb, video_emb, text_to_video = _random_problem(num_videos=300, max_captions=3, dim=256, seed=1)
    dense = retrieval_ranks(text_emb, video_emb, text_to_video, chunk_size=10**6)
    for chunk_size in (1, 5, 64):
        chunked = retrieval_ranks(text_emb, video_emb, text_to_video, chunk_size=chunk_size)
        assert torch.equal(chunked[0], dense[0]) and torch.equal(chunked[1], dense[1])


def test_float64_and_half_inputs_give_same_ranks_as_float32():
    text_emb, video_emb, text_to_video = _random_problem(seed=3)
    ref = retrieval_ranks(text_emb, video_emb, text_to_video)
    got64 = retrieval_ranks(text_emb.double(), video_emb.double(), text_to_video)
    assert torch.equal(ref[0], got64[0]) and torch.equal(ref[1], got64[1])
    got_bf16 = retrieval_ranks(text_emb.bfloat16(), video_emb.bfloat16(), text_to_video)  # must simply run
    assert got_bf16[0].shape == ref[0].shape


def test_perfect_embeddings():
    video_emb = torch.eye(5)
    text_to_video = torch.tensor([0, 1, 2, 3, 4, 0, 2, 2])
    text_emb = video_emb[text_to_video]
    metrics = retrieval_metrics(text_emb, video_emb, text_to_video, chunk_size=3)
    for direction in ("t2v", "v2t"):
        assert metrics[f"{direction}_r1"] == 100.0
        assert metrics[f"{direction}_r10"] == 100.0
        assert metrics[f"{direction}_mdr"] == 1.0
        assert metrics[f"{direction}_mnr"] == 1.0


def test_hand_computed_ranks():
    # 3 videos on the unit circle; 4 captions. Caption -> video: [0, 0, 1, 2].
    angle = torch.tensor([0.0, 1.0, 2.0])
    video_emb = torch.stack([angle.cos(), angle.sin()], dim=1)
    caption_angle = torch.tensor([0.1, 1.6, 0.9, 0.2])
    text_emb = torch.stack([caption_angle.cos(), caption_angle.sin()], dim=1)
    text_to_video = torch.tensor([0, 0, 1, 2])
    # Similarity = cos(angle difference); per caption, videos ordered by angular distance:
    #   caption 0 (0.1): v0 (0.1), v1 (0.9), v2 (1.9)  -> own v0 rank 1
    #   caption 1 (1.6): v2 (0.4), v1 (0.6), v0 (1.6)  -> own v0 rank 3
    #   caption 2 (0.9): v1 (0.1), v0 (0.9), v2 (1.1)  -> own v1 rank 1
    #   caption 3 (0.2): v0 (0.2), v1 (0.8), v2 (1.8)  -> own v2 rank 3
    # Per video, captions ordered by distance:
    #   v0 (0.0): c0 (0.1), c3 (0.2), c2 (0.9), c1 (1.6) -> own c0 rank 1, c1 rank 4 -> best 1
    #   v1 (1.0): c2 (0.1), c1 (0.6), c3 (0.8), c0 (0.9) -> own c2 rank 1
    #   v2 (2.0): c1 (0.4), c2 (1.1), c3 (1.8), c0 (1.9) -> own c3 rank 3
    t2v, v2t = retrieval_ranks(text_emb, video_emb, text_to_video, chunk_size=2)
    assert t2v.tolist() == [1, 3, 1, 3]
    assert v2t.tolist() == [1, 1, 3]

    # Best-of-captions: v0's good caption c0 hides its bad caption c1. Without c0, v0 has only c1,
    # the farthest of the 3 remaining captions, so v0 drops to rank 3.
    keep = torch.tensor([1, 2, 3])
    _, v2t_without_c0 = retrieval_ranks(text_emb[keep], video_emb, text_to_video[keep])
    assert v2t_without_c0.tolist() == [3, 1, 3]

    metrics = retrieval_metrics(text_emb, video_emb, text_to_video)
    assert metrics["t2v_r1"] == 50.0
    assert metrics["t2v_mdr"] == 2.0  # ranks [1, 1, 3, 3]: mean of the two middle values
    assert metrics["t2v_mnr"] == 2.0
    assert metrics["v2t_r1"] == pytest.approx(200 / 3)
    assert metrics["v2t_r5"] == 100.0
    assert metrics["v2t_mdr"] == 1.0
    assert metrics["v2t_mnr"] == pytest.approx(5 / 3)


def test_ties_count_against_the_correct_item():
    # Videos 3 and 6 duplicate video 0, and their captions duplicate video 0's captions, so each
    # of these captions ties between three videos and each of these videos ties between six
    # captions. The width and count are chosen so that plain float32 MKL matmuls compute identical
    # columns differently (the float64-accumulated similarities must not).
    num_videos, dim = 7, 768
    gen = torch.Generator().manual_seed(0)
    video_emb = F.normalize(torch.randn(num_videos, dim, generator=gen), dim=1)
    video_emb[3] = video_emb[6] = video_emb[0]
    text_to_video = torch.arange(num_videos).repeat(2)  # (14,), two captions per video
    text_emb = F.normalize(video_emb[text_to_video] + 0.02 * torch.randn(14, dim, generator=gen), dim=1)
    for duplicate in (3, 6):
        text_emb[duplicate] = text_emb[0]
        text_emb[num_videos + duplicate] = text_emb[num_videos]
    # A caption of video 0, 3 or 6 ties with the two other copies of its video: rank 3. Each of those
    # videos' best own caption ties with the two copies of it owned by the other two videos: rank 3.
    tied = {0, 3, 6}
    expected_t2v = [3 if v in tied else 1 for v in text_to_video.tolist()]
    expected_v2t = [3 if v in tied else 1 for v in range(num_videos)]
    for chunk_size in (1, 2, 5, 100):
        t2v, v2t = retrieval_ranks(text_emb, video_emb, text_to_video, chunk_size=chunk_size)
        assert t2v.tolist() == expected_t2v, chunk_size
        assert v2t.tolist() == expected_v2t, chunk_size


@pytest.mark.parametrize("dsl", [False, True])
def test_collapsed_model_gets_worst_ranks(dsl):
    # Identical embeddings: every candidate ties with the correct one, so nothing is retrieved.
    # Optimistic ties would report R@1 = 100% here.
    text_to_video = torch.tensor([0, 1, 1, 2, 3, 3, 3])  # V = 4, Q = 7
    text_emb = F.normalize(torch.ones(7, 8), dim=1)
    video_emb = F.normalize(torch.ones(4, 8), dim=1)
    for chunk_size in (1, 3, 100):
        t2v, v2t = retrieval_ranks(text_emb, video_emb, text_to_video, chunk_size=chunk_size, dsl=dsl)
        assert t2v.tolist() == [4] * 7  # rank V
        captions_per_video = torch.bincount(text_to_video)
        assert v2t.tolist() == (7 - captions_per_video + 1).tolist()  # all other videos' captions first
    metrics = retrieval_metrics(text_emb, video_emb, text_to_video)
    assert metrics["t2v_r1"] == 0.0 and metrics["v2t_r1"] == 0.0


def test_dsl_scores_keep_float64_exponent_range():
    # Caption 2 is far from every video: its DSL weights are ~exp(-160) and ~exp(-180), which flush to
    # -0.0 in float32 and would tie (rank 2). In float64 range its own video's score, -0.78·e^-178,
    # is above the other's, -0.62·e^-162 (DSL scales negative similarities towards zero).
    video_emb = torch.eye(2)
    text_emb = torch.stack(
        [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), F.normalize(torch.tensor([-0.4, -0.5]), dim=0)]
    )
    text_to_video = torch.tensor([0, 1, 1])
    t2v, _ = retrieval_ranks(text_emb, video_emb, text_to_video, dsl=True, dsl_temperature=100.0)
    assert t2v.tolist() == [1, 1, 1]
    ref_t2v, _ = _dense_reference(text_emb, video_emb, text_to_video, dsl_temperature=100.0)
    assert ref_t2v.tolist() == [1, 1, 1]


def test_dsl_follows_the_authors_clip_vip_rule_in_both_directions():
    """CLIP-ViP's evaluation (as in MAMA's run_video_retrieval.py): ``sim = sim * softmax(100 * sim,
    axis=0)`` on the (captions, videos) matrix, then t2v ranks ``sim`` and v2t ranks ``sim.T``."""
    text_emb, video_emb, text_to_video = _random_problem(num_videos=9, max_captions=3, dim=4, seed=3)
    sim = (text_emb.double() @ video_emb.double().T).float().double()  # (Q, V)
    dsl = sim * torch.softmax(100.0 * sim, dim=0)  # the one re-weighted matrix

    def pessimistic_rank(scores: torch.Tensor, own: list[int]) -> int:
        best = max(float(scores[i]) for i in own)
        return 1 + sum(int(float(scores[i]) >= best) for i in range(len(scores)) if i not in own)

    expected_t2v = [pessimistic_rank(dsl[q], [int(text_to_video[q])]) for q in range(len(sim))]
    own_captions = [[q for q in range(len(sim)) if int(text_to_video[q]) == v] for v in range(len(video_emb))]
    expected_v2t = [pessimistic_rank(dsl.T[v], own_captions[v]) for v in range(len(video_emb))]
    for chunk_size in (1, 4, 100):
        t2v, v2t = retrieval_ranks(text_emb, video_emb, text_to_video, chunk_size=chunk_size, dsl=True)
        assert t2v.tolist() == expected_t2v and v2t.tolist() == expected_v2t, chunk_size
    # The earlier rule (v2t normalised over videos) ranks differently here, so the test can tell them apart.
    over_videos = sim.T * torch.softmax(100.0 * sim.T, dim=0)  # (V, Q)
    assert [pessimistic_rank(over_videos[v], own_captions[v]) for v in range(len(video_emb))] != expected_v2t


def test_dsl_metrics_are_prefixed_metrics_of_dsl_ranks():
    text_emb, video_emb, text_to_video = _random_problem(seed=5)
    got = dsl_metrics(text_emb, video_emb, text_to_video, chunk_size=7, temperature=50.0)
    ranks = retrieval_ranks(text_emb, video_emb, text_to_video, dsl=True, dsl_temperature=50.0)
    assert got == {f"dsl_{key}": value for key, value in metrics_from_ranks(*ranks).items()}
    assert list(got) == [f"dsl_{key}" for key in retrieval_metrics(text_emb, video_emb, text_to_video)]
    assert dsl_metrics(text_emb, video_emb, text_to_video, temperature=5.0) != got  # temperature is used


def test_recall_and_rank_summary_from_ranks():
    t2v = torch.tensor([1, 2, 5, 6, 10, 11])
    v2t = torch.tensor([3, 1, 20])
    metrics = metrics_from_ranks(t2v, v2t)
    assert metrics["t2v_r1"] == pytest.approx(100 / 6)
    assert metrics["t2v_r5"] == pytest.approx(50.0)
    assert metrics["t2v_r10"] == pytest.approx(500 / 6)
    assert metrics["t2v_mdr"] == 5.5
    assert metrics["t2v_mnr"] == pytest.approx(35 / 6)
    assert metrics["v2t_mdr"] == 3.0
    assert metrics["v2t_r10"] == pytest.approx(200 / 3)
    assert all(isinstance(value, float) and math.isfinite(value) for value in metrics.values())


def test_bucket_recall():
    ranks = torch.tensor([1, 3, 1, 1, 7, 2])
    buckets = ["head", "head", "tail", "mid", "tail", "tail"]
    assert bucket_recall(ranks, buckets) == {"head": 50.0, "tail": pytest.approx(100 / 3), "mid": 100.0}
    assert list(bucket_recall(ranks, buckets)) == ["head", "tail", "mid"]
    assert bucket_recall(ranks, buckets, k=5) == {"head": 100.0, "tail": pytest.approx(200 / 3), "mid": 100.0}
    with pytest.raises(ValueError):
        bucket_recall(ranks, buckets[:-1])


def test_input_validation():
    text_emb, video_emb, text_to_video = _random_problem(num_videos=4, max_captions=1)
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(text_emb[:3], video_emb, torch.tensor([0, 1, 2]))  # video 3 has none
    with pytest.raises(ValueError, match="range"):
        retrieval_ranks(text_emb, video_emb, text_to_video + 1)
    with pytest.raises(ValueError, match="widths"):
        retrieval_ranks(text_emb[:, :8], video_emb, text_to_video)
    with pytest.raises(ValueError, match="shape"):
        retrieval_ranks(text_emb, video_emb, text_to_video[:-1])
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_ranks(text_emb, video_emb, text_to_video, chunk_size=0)
    for temperature in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="dsl_temperature"):
            retrieval_ranks(text_emb, video_emb, text_to_video, dsl=True, dsl_temperature=temperature)
