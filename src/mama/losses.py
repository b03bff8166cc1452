"""Contrastive losses: the subtractive angular margin loss of MAMA and the InfoNCE it generalises.

Every loss here is a pure function of tensors. Embeddings are L2-normalised rows; row ``i`` of the
video and text matrices is a positive pair. The formulas are in the README's "Method notes" and in :func:`angular_margin_nce`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Reduction = Literal["none", "mean", "sum"]
MarginMode = Literal["official", "positives"]

LOG_LOGIT_SCALE_INIT = math.log(100.0)
LOG_LOGIT_SCALE_MAX = math.log(200.0)


def _reduce(loss_per_sample: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "none":
        return loss_per_sample
    if reduction == "mean":
        return loss_per_sample.mean()
    if reduction == "sum":
        return loss_per_sample.sum()
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def margin_cosine(cos: Tensor, positive_mask: Tensor, margin: float, mode: MarginMode, eps: float = 1e-6) -> Tensor:
    """Replace ``cos(theta)`` by ``cos(theta - margin)`` where the margin applies.

    ``cos(theta - mu) = c cos(mu) + sqrt(1 - c^2) sin(mu)`` avoids arccos, whose slope is infinite at
    ``c = +-1`` (exactly where positive pairs live); clamping ``1 - c^2`` at ``eps`` keeps the gradient
    finite for identical or opposite pairs.

    Args:
        cos: (n, m) cosine similarities.
        positive_mask: (n, m) bool, True at the positive pair of each row.
        margin: mu in radians, >= 0.
        mode: "official" shifts every positive and every negative with theta <= mu (the authors'
            code); "positives" shifts the positives only.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0 radians, got {margin}")
    if mode not in ("official", "positives"):
        raise ValueError(f"mode must be 'official' or 'positives', got {mode!r}")
    if margin == 0:
        return cos
    sin_theta = torch.sqrt(torch.clamp(1.0 - cos * cos, min=eps))
    shifted = cos * math.cos(margin) + sin_theta * math.sin(margin)
    shift = positive_mask
    if mode == "official":
        # theta <= mu  <=>  cos(theta) >= cos(mu): near-duplicate negatives are shifted too.
        shift = shift | (cos >= math.cos(margin))
    return torch.where(shift, shifted, cos)


def angular_margin_nce(
    video_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor | float,
    margin: float,
    reduction: Reduction = "mean",
    mode: MarginMode = "official",
    *,
    all_video_emb: Tensor | None = None,
    all_text_emb: Tensor | None = None,
    offset: int = 0,
) -> Tensor:
    """Subtractive angular margin contrastive loss, per sample or reduced.

    ``loss_i = CE(S[i, :], i) + CE(S[:, i], i)`` with ``S = logit_scale * cos(theta')``, where
    ``theta' = theta - margin`` at the positives (and, in "official" mode, at negatives closer than
    the margin). With ``margin = 0`` this is exactly the symmetric InfoNCE of CLIP written as a sum of
    the two directions (CLIP averages them, i.e. reports half of this value).

    Args:
        video_emb: (n, d) L2-normalised video embeddings of this process's samples.
        text_emb: (n, d) L2-normalised text embeddings; row i is the positive of ``video_emb[i]``.
        logit_scale: already-exponentiated scalar (e.g. ``LogitScale()()``).
        margin: mu in radians.
        reduction: "none" returns the (n,) per-sample loss; "mean" / "sum" reduce it.
        mode: "official" or "positives" (see :func:`margin_cosine`).
        all_video_emb, all_text_emb: (N, d) embeddings of the global batch when negatives come from
            several processes; default: the local ones. Rows ``offset .. offset + n`` of them must be
            this process's samples, so each process computes its own rows against all columns.
        offset: index of this process's first sample in the global batch.

    Returns:
        (n,) if ``reduction == "none"``, else a scalar. Always float32 (float64 for float64 inputs),
        computed outside autocast: the angular terms are too steep for half precision.
    """
    if video_emb.ndim != 2 or video_emb.shape != text_emb.shape:
        raise ValueError(
            f"video_emb and text_emb must both be (n, d), got {tuple(video_emb.shape)} and {tuple(text_emb.shape)}"
        )
    all_video_emb = video_emb if all_video_emb is None else all_video_emb
    all_text_emb = text_emb if all_text_emb is None else all_text_emb
    n = video_emb.shape[0]
    if all_video_emb.shape[0] < offset + n or all_text_emb.shape[0] < offset + n:
        raise ValueError(f"global batch of {all_video_emb.shape[0]} cannot hold rows {offset}..{offset + n}")

    dtype = torch.float64 if video_emb.dtype == torch.float64 else torch.float32
    device_type = video_emb.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        video, text = video_emb.to(dtype), text_emb.to(dtype)
        all_video, all_text = all_video_emb.to(dtype), all_text_emb.to(dtype)
        scale = torch.as_tensor(logit_scale, device=video.device).to(dtype)
        targets = torch.arange(offset, offset + n, device=video.device)
        # (n, N): this process's rows against every column of the global batch.
        cos_v2t = video @ all_text.T
        cos_t2v = text @ all_video.T
        positive = F.one_hot(targets, num_classes=cos_v2t.shape[1]).bool()
        logits_v2t = scale * margin_cosine(cos_v2t, positive, margin, mode)
        logits_t2v = scale * margin_cosine(cos_t2v, positive, margin, mode)
        loss_per_sample = F.cross_entropy(logits_v2t, targets, reduction="none") + F.cross_entropy(
            logits_t2v, targets, reduction="none"
        )
    return _reduce(loss_per_sample, reduction)


def infonce(video_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float, reduction: Reduction = "mean") -> Tensor:
    """Symmetric InfoNCE (CLIP), as the sum of both directions per sample; margin 0 of the MAMA loss."""
    return angular_margin_nce(video_emb, text_emb, logit_scale, margin=0.0, reduction=reduction)


class LogitScale(nn.Module):
    """Learnable log logit scale, CLIP style: ``forward()`` returns ``exp(s)``.

    Call :meth:`clamp_` after every optimiser step to keep ``s`` in ``[0, log_max]``.
    """

    def __init__(
        self, init: float = LOG_LOGIT_SCALE_INIT, log_max: float = LOG_LOGIT_SCALE_MAX, learnable: bool = True
    ):
        super().__init__()
        if not 0.0 <= init <= log_max:
            raise ValueError(f"initial log logit scale {init} outside [0, {log_max}]")
        self.log_max = log_max
        self.log_scale = nn.Parameter(torch.tensor(float(init)), requires_grad=learnable)

    def forward(self) -> Tensor:
        return self.log_scale.exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_scale.clamp_(0.0, self.log_max)
