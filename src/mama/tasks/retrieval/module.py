"""The retrieval task module: a video-text model plus its contrastive loss, returning per-sample losses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from mama.config import LossConfig
from mama.distributed import gather_with_grad
from mama.losses import LogitScale, angular_margin_nce
from mama.models.registry import VideoTextModel


@dataclass
class EmbeddingCache:
    """Gradient-free embeddings of this rank's whole batch, for gradient accumulation.

    When a micro-batch is re-encoded with gradients, its rows replace ``rows`` of the cache, so its loss
    still sees every other sample of the global batch as a negative (open_clip's accumulation scheme).
    """

    video_emb: Tensor  # (n, D), detached
    text_emb: Tensor  # (n, D), detached
    rows: slice = field(default_factory=lambda: slice(0, 0))

    def splice(self, cached: Tensor, live: Tensor) -> Tensor:
        # (n, D) with rows[start:stop] taken from the live (m, D) micro-batch embeddings.
        return torch.cat([cached[: self.rows.start], live.to(cached.dtype), cached[self.rows.stop :]])

    def at(self, rows: slice) -> EmbeddingCache:
        return EmbeddingCache(self.video_emb, self.text_emb, rows)


class RetrievalModule(nn.Module):
    """The retrieval task module. Owns the model and the learnable logit scale; ``forward(batch)`` gives per-sample losses.

    ``batch``: ``video`` (B, T, C, H, W) float, ``input_ids`` and ``attention_mask`` (B, L).
    """

    def __init__(self, model: nn.Module, loss_cfg: LossConfig):
        super().__init__()
        self.model = model
        self.logit_scale = LogitScale(loss_cfg.init_logit_scale, loss_cfg.max_logit_scale, loss_cfg.learn_logit_scale)
        self.margin = loss_cfg.margin
        self.mode = loss_cfg.mode

    def encode(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """(B, D) video and (B, D) text embeddings, L2-normalised by the model."""
        model = cast(VideoTextModel, self.model)
        video_emb = model.encode_video(batch["video"])
        text_emb = model.encode_text(batch["input_ids"], batch["attention_mask"])
        return video_emb, text_emb

    def forward(self, batch: Mapping[str, Any], cache: EmbeddingCache | None = None) -> dict[str, Tensor]:
        """Per-sample losses (n,) of this rank's rows against the global batch.

        With ``cache``, ``batch`` is one micro-batch: its embeddings replace ``cache.rows`` and the losses
        cover every row of the cached batch, differentiable only through this micro-batch.
        """
        video_emb, text_emb = self.encode(batch)
        scale_grad = True
        if cache is not None:
            video_emb = cache.splice(cache.video_emb, video_emb)
            text_emb = cache.splice(cache.text_emb, text_emb)
            # The logit scale enters every micro-batch's loss directly, not through its embeddings:
            # its gradient must be taken once, not once per micro-batch. The last micro-batch owns it
            # (under DDP that is the backward that synchronises gradients).
            scale_grad = cache.rows.stop == len(cache.video_emb)
        loss = self.loss(video_emb, text_emb, scale_grad)
        return {"loss_per_sample": loss, "video_emb": video_emb, "text_emb": text_emb}

    @torch.no_grad()
    def cache_batch(self, micro_batches: Sequence[Mapping[str, Any]]) -> EmbeddingCache:
        """Embed every micro-batch without gradients and stack them into one cache (n, D)."""
        pairs = [self.encode(mb) for mb in micro_batches]
        return EmbeddingCache(torch.cat([v for v, _ in pairs]), torch.cat([t for _, t in pairs]))

    def cached_loss(self, cache: EmbeddingCache) -> Tensor:
        """(n,) per-sample losses of the cached batch (no gradient when the cache has none)."""
        return self.loss(cache.video_emb, cache.text_emb)

    def after_optimizer_step(self) -> None:
        self.logit_scale.clamp_()

    def loss(self, video_emb: Tensor, text_emb: Tensor, scale_grad: bool = True) -> Tensor:
        """(n,) per-sample losses of this rank's (n, D) embeddings against the global batch."""
        # Negatives span the global batch when several processes train together.
        all_video, offset = gather_with_grad(video_emb)
        all_text, _ = gather_with_grad(text_emb)
        logit_scale = self.logit_scale() if scale_grad else self.logit_scale().detach()
        return angular_margin_nce(
            video_emb,
            text_emb,
            logit_scale,
            self.margin,
            reduction="none",
            mode=self.mode,
            all_video_emb=all_video,
            all_text_emb=all_text,
            offset=offset,
        )
