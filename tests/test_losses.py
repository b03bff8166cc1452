import math

import pytest
import torch
import torch.nn.functional as F

from mama.losses import (
    LOG_LOGIT_SCALE_INIT,
    LOG_LOGIT_SCALE_MAX,
    LogitScale,
    angular_margin_nce,
    infonce,
    margin_cosine,
)

MODES = ["official", "positives"]


def _embeddings(n: int = 8, dim: int = 16, seed: int = 0, dtype: torch.dtype = torch.float32):
    """(n, dim) L2-normalised video and text rows, each text a noisy copy of its video."""
    gen = torch.Generator().manual_seed(seed)
    video = F.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=1)
    text = F.normalize(video + 0.8 * torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=1)
    return video.to(dtype), text.to(dtype)


def _clip_loss_per_sample(video, text, scale):
    """CLIP's symmetric InfoNCE per sample, as the sum of both directions, written independently."""
    logits = scale * video @ text.T
    targets = torch.arange(len(video))
    return F.cross_entropy(logits, targets, reduction="none") + F.cross_entropy(logits.T, targets, reduction="none")


def _arccos_reference(video, text, scale, margin, mode):
    """The loss's definition literally: theta = arccos(C), shift, S = scale * cos(theta'). Per sample."""
    cos = video @ text.T
    theta = torch.arccos(cos)
    eye = torch.eye(len(video), dtype=torch.bool)
    shift = eye | (theta <= margin) if mode == "official" else eye
    logits = scale * torch.cos(torch.where(shift, theta - margin, theta))
    targets = torch.arange(len(video))
    return F.cross_entropy(logits, targets, reduction="none") + F.cross_entropy(logits.T, targets, reduction="none")


# --- margin 0 is CLIP ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_margin_zero_equals_clip_infonce(dtype, mode, reduction):
    video, text = _embeddings(n=12, dim=16, seed=1, dtype=dtype)
    scale = 37.0
    expected = _clip_loss_per_sample(video, text, scale)
    expected = {"none": expected, "mean": expected.mean(), "sum": expected.sum()}[reduction]
    got = angular_margin_nce(video, text, scale, margin=0.0, reduction=reduction, mode=mode)
    assert got.shape == expected.shape
    assert got.dtype == dtype
    # float32: the two matmul orders round differently, so the bound is relative (losses are ~7).
    tol = {"rtol": 0.0, "atol": 1e-6} if dtype == torch.float64 else {"rtol": 2e-6, "atol": 1e-6}
    torch.testing.assert_close(got, expected, **tol)
    torch.testing.assert_close(infonce(video, text, scale, reduction=reduction), expected, **tol)


def test_margin_zero_is_half_of_clip_mean_convention():
    # CLIP reports (CE_v2t + CE_t2v) / 2 averaged over the batch; ours is the sum of directions.
    video, text = _embeddings(n=6, seed=2)
    logits = 20.0 * video @ text.T
    targets = torch.arange(6)
    clip = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    torch.testing.assert_close(angular_margin_nce(video, text, 20.0, 0.0), 2 * clip, rtol=0, atol=1e-6)


# --- margin > 0 against arccos ------------------------------------------------------------------


def _with_near_duplicates(n=10, dim=6, seed=3, margin=0.3):
    """Random float64 pairs plus two negatives placed at angle 0.75 * margin from a video.

    Not margin / 2: there cos(theta - mu) = cos(theta), so the shift would change nothing.
    """
    video, text = _embeddings(n=n, dim=dim, seed=seed, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed + 100)
    for i, j in [(0, 1), (4, 7)]:
        # Rotate video[i] by 0.75 * margin towards a random orthogonal direction and make it text[j].
        direction = torch.randn(dim, generator=gen, dtype=torch.float64)
        direction = F.normalize(direction - (direction @ video[i]) * video[i], dim=0)
        text[j] = math.cos(0.75 * margin) * video[i] + math.sin(0.75 * margin) * direction
    return video, text


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("margin", [0.05, 0.3])
def test_margin_matches_arccos_reference(mode, margin):
    video, text = _with_near_duplicates(margin=0.3)
    cos = video @ text.T
    assert (cos.abs() < 1 - 1e-3).all(), "reference is only trustworthy away from |cos| = 1"
    off_diag_close = (torch.arccos(cos) <= margin) & ~torch.eye(len(video), dtype=torch.bool)
    if margin == 0.3:
        assert off_diag_close.sum() >= 2, "the official-mode branch for negatives must be exercised"
    scale = torch.tensor(30.0, dtype=torch.float64)

    video_a, text_a, scale_a = (x.clone().requires_grad_() for x in (video, text, scale))
    got = angular_margin_nce(video_a, text_a, scale_a, margin, reduction="none", mode=mode)
    video_b, text_b, scale_b = (x.clone().requires_grad_() for x in (video, text, scale))
    expected = _arccos_reference(video_b, text_b, scale_b, margin, mode)

    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)
    if margin == 0.3 and mode == "official":
        positives_only = _arccos_reference(video, text, scale, margin, "positives")
        assert (got.detach() - positives_only).abs().max() > 1e-3, "near duplicates must change the loss"
    got.sum().backward()
    expected.sum().backward()
    for a, b in [(video_a, video_b), (text_a, text_b), (scale_a, scale_b)]:
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-8)


def test_margin_changes_the_loss():
    video, text = _embeddings(seed=4)
    assert not torch.allclose(
        angular_margin_nce(video, text, 30.0, 0.1, reduction="none"),
        angular_margin_nce(video, text, 30.0, 0.0, reduction="none"),
    )


def test_margin_cosine_is_cos_of_shifted_angle():
    theta = torch.linspace(0.01, math.pi - 0.01, 101, dtype=torch.float64)
    cos = torch.cos(theta)[:, None]
    shifted = margin_cosine(cos, torch.ones_like(cos, dtype=torch.bool), 0.2, "positives")
    torch.testing.assert_close(shifted[:, 0], torch.cos(theta - 0.2), rtol=0, atol=1e-12)
    unshifted = margin_cosine(cos, torch.zeros_like(cos, dtype=torch.bool), 0.2, "positives")
    torch.testing.assert_close(unshifted, cos, rtol=0, atol=0)


# --- official vs positives ----------------------------------------------------------------------


def test_modes_identical_without_near_duplicate_negatives():
    video, text = _embeddings(n=10, dim=32, seed=5)
    margin = 0.2
    cos = video @ text.T
    off_diag = ~torch.eye(10, dtype=torch.bool)
    assert (cos[off_diag] < math.cos(margin)).all()
    official = angular_margin_nce(video, text, 50.0, margin, reduction="none", mode="official")
    positives = angular_margin_nce(video, text, 50.0, margin, reduction="none", mode="positives")
    torch.testing.assert_close(official, positives, rtol=0, atol=0)


def test_modes_differ_only_where_a_negative_is_within_the_margin():
    video, text = _embeddings(n=10, dim=32, seed=6, dtype=torch.float64)
    margin = 0.2
    # text[3] becomes a near duplicate of video[5] (angle 0.15 < margin): the negative pair (5, 3).
    # (An angle of exactly margin / 2 would be a fixed point: cos(0.1 - 0.2) = cos(0.1).)
    direction = F.normalize(text[3] - (text[3] @ video[5]) * video[5], dim=0)
    text[3] = math.cos(0.15) * video[5] + math.sin(0.15) * direction
    cos = video @ text.T
    close = (cos >= math.cos(margin)) & ~torch.eye(10, dtype=torch.bool)
    assert close.nonzero().tolist() == [[5, 3]]

    official = angular_margin_nce(video, text, 50.0, margin, reduction="none", mode="official")
    positives = angular_margin_nce(video, text, 50.0, margin, reduction="none", mode="positives")
    changed = (official - positives).abs() > 1e-12
    # S[5, 3] enters video 5's row (sample 5) and text 3's column (sample 3), nothing else.
    assert changed.nonzero().flatten().tolist() == [3, 5]
    # Shifting the near-duplicate negative raises its logit, so both samples get a larger loss.
    assert (official[[3, 5]] > positives[[3, 5]]).all()


# --- reductions and argument checks -------------------------------------------------------------


def test_reductions_agree():
    video, text = _embeddings(n=9, seed=7)
    per_sample = angular_margin_nce(video, text, 25.0, 0.1, reduction="none")
    assert per_sample.shape == (9,)
    torch.testing.assert_close(per_sample.mean(), angular_margin_nce(video, text, 25.0, 0.1, reduction="mean"))
    torch.testing.assert_close(per_sample.sum(), angular_margin_nce(video, text, 25.0, 0.1, reduction="sum"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"reduction": "avg"},
        {"mode": "negatives"},
        {"mode": "negatives", "margin": 0.0},
        {"margin": -0.1},
    ],
)
def test_invalid_arguments_raise(kwargs):
    video, text = _embeddings(n=4)
    args = {"margin": 0.1, **kwargs}
    with pytest.raises(ValueError):
        angular_margin_nce(video, text, 10.0, **args)


def test_mismatched_shapes_raise():
    video, text = _embeddings(n=4)
    with pytest.raises(ValueError):
        angular_margin_nce(video, text[:3], 10.0, 0.1)


# --- numerics -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("margin", [0.05, 0.0])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["identical", "opposite", "both"])
def test_gradients_finite_at_cos_plus_minus_one(dtype, margin, mode, case):
    video, text = _embeddings(n=6, dim=8, seed=8, dtype=dtype)
    if case in ("identical", "both"):
        text[0] = video[0]  # positive with cos = 1
        text[2] = video[1]  # negative with cos = 1 (within the margin: shifted in official mode)
    if case in ("opposite", "both"):
        text[3] = -video[3]  # positive with cos = -1
        text[4] = -video[5]  # negative with cos = -1
    video.requires_grad_()
    text.requires_grad_()
    logit_scale = LogitScale().to(dtype)
    loss = angular_margin_nce(video, text, logit_scale(), margin, reduction="mean", mode=mode)
    loss.backward()
    assert torch.isfinite(loss)
    for grad in (video.grad, text.grad, logit_scale.log_scale.grad):
        assert grad is not None and torch.isfinite(grad).all()


@pytest.mark.parametrize("margin", [0.0, 0.05])
def test_bf16_autocast_computes_in_fp32(margin):
    video, text = _embeddings(n=8, seed=9)
    video_bf16, text_bf16 = video.bfloat16(), text.bfloat16()
    scale = torch.tensor(LOG_LOGIT_SCALE_INIT).exp()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = angular_margin_nce(video_bf16, text_bf16, scale, margin, reduction="none")
    assert got.dtype == torch.float32
    expected = angular_margin_nce(video_bf16.float(), text_bf16.float(), scale, margin, reduction="none")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --- the margin pushes positives out to angle mu ------------------------------------------------


def _single_pair_loss(angle: torch.Tensor, margin: float) -> torch.Tensor:
    """Loss of sample 0 whose text sits at ``angle`` from its video; the other pair is orthogonal."""
    e1, e2, e3 = torch.eye(3, dtype=torch.float64)
    video = torch.stack([e1, e3])
    text = torch.stack([torch.cos(angle) * e1 + torch.sin(angle) * e2, e3])
    return angular_margin_nce(video, text, 10.0, margin, reduction="none", mode="positives")[0]


def test_positive_logit_peaks_at_margin():
    margin = 0.3
    theta = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
    cos = torch.cos(theta)[:, None]
    logit = margin_cosine(cos, torch.ones_like(cos, dtype=torch.bool), margin, "positives")[:, 0]
    assert abs(theta[logit.argmax()].item() - margin) < 2e-3


@pytest.mark.parametrize("margin", [0.1, 0.3])
def test_loss_gradient_wrt_positive_angle_changes_sign_at_margin(margin):
    def slope(angle: float) -> float:
        angle_t = torch.tensor(angle, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(_single_pair_loss(angle_t, margin), angle_t)
        return grad.item()

    # Closer than mu: the loss falls as the angle grows (pushed out); farther: pulled in.
    assert slope(0.5 * margin) < 0
    assert slope(0.9 * margin) < 0
    assert slope(1.1 * margin) > 0
    assert slope(2.0 * margin) > 0
    assert abs(slope(margin)) < 1e-9
    # Without margin the pair is pulled in at every angle.
    angle_t = torch.tensor(0.5 * margin, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(_single_pair_loss(angle_t, 0.0), angle_t)
    assert grad.item() > 0


# --- global batch across processes --------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("margin", [0.0, 0.2])
def test_two_simulated_ranks_match_the_full_batch(mode, margin):
    video, text = _with_near_duplicates(n=10, dim=6, seed=10, margin=0.3)
    scale = torch.tensor(20.0, dtype=torch.float64)

    full_video, full_text = video.clone().requires_grad_(), text.clone().requires_grad_()
    full = angular_margin_nce(full_video, full_text, scale, margin, reduction="none", mode=mode)
    full.sum().backward()

    # Each "rank" owns 5 rows; its local rows are slices of the gathered global tensors, so the
    # gradient accumulated over both ranks is what the all-gather backward would sum.
    gathered_video, gathered_text = video.clone().requires_grad_(), text.clone().requires_grad_()
    parts = []
    for offset in (0, 5):
        local = angular_margin_nce(
            gathered_video[offset : offset + 5],
            gathered_text[offset : offset + 5],
            scale,
            margin,
            reduction="none",
            mode=mode,
            all_video_emb=gathered_video,
            all_text_emb=gathered_text,
            offset=offset,
        )
        local.sum().backward()
        parts.append(local.detach())
        torch.testing.assert_close(local.detach(), full.detach()[offset : offset + 5], rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat(parts), full.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(gathered_video.grad, full_video.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(gathered_text.grad, full_text.grad, rtol=0, atol=1e-12)


def test_offset_past_global_batch_raises():
    video, text = _embeddings(n=4)
    with pytest.raises(ValueError):
        angular_margin_nce(video, text, 10.0, 0.0, all_video_emb=video, all_text_emb=text, offset=2)


def test_local_rows_differ_from_a_local_only_loss():
    # Guards the test above: negatives from the other rank must actually matter.
    video, text = _embeddings(n=10, seed=11)
    local_only = angular_margin_nce(video[:5], text[:5], 20.0, 0.1, reduction="none")
    global_rows = angular_margin_nce(
        video[:5], text[:5], 20.0, 0.1, reduction="none", all_video_emb=video, all_text_emb=text, offset=0
    )
    assert (global_rows > local_only).all()


# --- logit scale --------------------------------------------------------------------------------


def test_logit_scale_forward_is_exp_of_init():
    assert LogitScale()().item() == pytest.approx(100.0, rel=1e-6)
    assert LogitScale(init=math.log(10.0))().item() == pytest.approx(10.0, rel=1e-6)
    with pytest.raises(ValueError):
        LogitScale(init=-0.1)
    with pytest.raises(ValueError):
        LogitScale(init=LOG_LOGIT_SCALE_MAX + 0.1)


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_logit_scale_clamp_after_big_step(direction):
    logit_scale = LogitScale()
    optimizer = torch.optim.SGD(logit_scale.parameters(), lr=100.0)
    (-direction * logit_scale()).backward()  # gradient descent moves log_scale by direction * 100 * 100
    optimizer.step()
    assert not 0.0 <= logit_scale.log_scale.item() <= LOG_LOGIT_SCALE_MAX
    logit_scale.clamp_()
    expected = LOG_LOGIT_SCALE_MAX if direction > 0 else 0.0
    assert logit_scale.log_scale.item() == pytest.approx(expected, abs=1e-6)
    assert logit_scale.log_scale.requires_grad
