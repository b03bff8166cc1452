"""The retrieval task: a video-text model plus its contrastive loss, returning named losses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from mama.config import LossConfig
from mama.distributed import gather_with_grad
from mama.losses import LogitScale, angular_margin_nce


class RetrievalTask(nn.Module):
    """Owns the model and the learnable logit scale; ``forward(batch)`` gives per-sample losses.

    ``batch``: ``video`` (B, T, C, H, W) float, ``input_ids`` and ``attention_mask`` (B, L).
    """

    def __init__(self, model: nn.Module, loss_cfg: LossConfig):
        super().__init__()
        self.model = model
        self.logit_scale = LogitScale(loss_cfg.init_logit_scale, loss_cfg.max_logit_scale, loss_cfg.learn_logit_scale)
        self.margin = loss_cfg.margin
        self.mode = loss_cfg.mode

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        video_emb = self.model.encode_video(batch["video"])
        text_emb = self.model.encode_text(batch["input_ids"], batch["attention_mask"])
        # Negatives span the global batch when several processes train together.
        all_video, offset = gather_with_grad(video_emb)
        all_text, _ = gather_with_grad(text_emb)
        loss_per_sample = angular_margin_nce(
            video_emb,
            text_emb,
            self.logit_scale(),
            self.margin,
            reduction="none",
            mode=self.mode,  # type: ignore[arg-type]
            all_video_emb=all_video,
            all_text_emb=all_text,
            offset=offset,
        )
        return {"loss_per_sample": loss_per_sample, "video_emb": video_emb, "text_emb": text_emb}
