"""The video QA task: a :class:`VideoQAModel` plus its losses, returning named per-sample losses.

``forward(batch)["loss_per_sample"]`` (B,) is what :class:`mama.weighting.MetaWeighting` weights, exactly
as for :class:`mama.tasks.retrieval.module.RetrievalModule`:

    loss_i = CE(answer logits / candidate scores of sample i, its answer)
             + contrastive_weight * contrastive_i        (contrastive_i = 0 for a row without a caption)

where ``contrastive_i`` is the angular margin contrastive loss (:func:`mama.losses.angular_margin_nce`) between the video
embedding of sample i and the embedding of its (LVLM) caption, with the other captioned rows of the
(global) batch as negatives. The authors add 0.25 x this term to the meta-weighted answer loss
(in their released QA code); here it is part of each sample's loss, so the learned weight scales both.

Batch keys (video always (B, T, C, H, W) float):

- open-ended (``answer_format="open"``): ``input_ids`` / ``attention_mask`` (B, L) the question,
  ``answer`` (B,) long, an index into the answer vocabulary (:class:`mama.metrics.qa.AnswerVocab`).
  Training samples whose answer is outside the vocabulary never reach the task: the dataset layer drops
  them from *training only* (an index of -1 here is an error). Evaluation keeps them, and
  :func:`mama.metrics.qa.open_accuracy` counts them wrong;
- multiple choice (``answer_format="mc"``): ``input_ids`` / ``attention_mask`` (B, C, L), row c the text
  of question + candidate c, ``answer`` (B,) long, the index of the correct candidate, and optionally
  ``candidate_mask`` (B, C) bool, False for padding candidates of questions with fewer than C;
- optional, either format: ``caption_ids`` / ``caption_mask`` (B, Lc) and ``has_caption`` (B,) bool
  (absent: every row has a caption). Rows without a caption add no contrastive loss and are not
  negatives for the others.

Under DDP every rank must run the same collectives: the contrastive term gathers on every rank whenever
the batch has ``caption_ids``, so either every rank's batch carries them (``has_caption`` may be all
False) or none does. A batch without captions leaves the encoder's embedding heads and the logit scale
without gradient (they serve only the contrastive term): wrap with ``find_unused_parameters=True`` when
some steps have no captions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mama.config import LossConfig
from mama.distributed import gather_rows, gather_with_grad
from mama.losses import LogitScale, angular_margin_nce
from mama.models.qa import VideoQAModel
from mama.models.registry import TokenEncoder


class QAModule(nn.Module):
    """Owns the QA model and the contrastive loss's learnable logit scale (see the module docstring)."""

    def __init__(self, model: VideoQAModel, loss_cfg: LossConfig):
        super().__init__()
        self.model = model
        # Same LossConfig as retrieval: margin mu (the authors' QA code used 0.05 rad), mode, logit scale.
        self.logit_scale = LogitScale(loss_cfg.init_logit_scale, loss_cfg.max_logit_scale, loss_cfg.learn_logit_scale)
        self.margin = loss_cfg.margin
        self.mode = loss_cfg.mode
        self.contrastive_weight = model.cfg.contrastive_weight

    def forward(self, batch: Mapping[str, Any], cache: QACache | None = None) -> dict[str, Tensor]:
        """Per-sample losses of one batch.

        Returns ``loss_per_sample`` (B,), ``answer_loss`` (B,), ``contrastive_loss`` (B,) (only when the
        batch has captions), and ``logits`` (B, K) (open-ended) or ``scores`` (B, C) (multiple choice).
        Losses are float32 (float64 for a float64 model) whatever the autocast dtype. With ``cache``
        (gradient accumulation), ``batch`` is the micro-batch at ``cache.rows`` and the losses cover every
        row of the cached batch, differentiable only through the micro-batch.
        """
        parts = self._encode(batch)
        out: dict[str, Tensor] = {"answer_loss": parts.answer_loss, parts.score_key: parts.scores}
        answer_loss, video_emb, text_emb, has_caption = (
            parts.answer_loss,
            parts.video_emb,
            parts.text_emb,
            parts.has_caption,
        )
        scale_grad = True
        if cache is not None:
            answer_loss = cache.splice(cache.answer_loss, answer_loss)
            if video_emb is not None and text_emb is not None:
                assert cache.video_emb is not None and cache.text_emb is not None
                video_emb, text_emb = cache.splice(cache.video_emb, video_emb), cache.splice(cache.text_emb, text_emb)
                has_caption = cache.has_caption
                # The logit scale enters every micro-batch's loss directly: the last micro-batch owns its
                # gradient, as in retrieval's accumulation.
                scale_grad = cache.rows.stop == len(cache.video_emb)
        loss_per_sample = answer_loss
        if video_emb is not None and text_emb is not None and has_caption is not None:
            contrastive = self.contrastive_from_embeddings(video_emb, text_emb, has_caption, scale_grad)
            out["contrastive_loss"] = contrastive
            loss_per_sample = loss_per_sample + self.contrastive_weight * contrastive
        out["loss_per_sample"] = loss_per_sample
        return out

    def _encode(self, batch: Mapping[str, Any]) -> _Parts:
        encoder = cast(TokenEncoder, self.model.encoder)
        # (B, Nv, Dv): encoded once, shared by the answer head and the contrastive embedding.
        video_tokens = encoder.video_tokens(batch["video"])
        answer = batch["answer"]
        if self.model.cfg.answer_format == "open":
            logits = self.model.open_logits_from_tokens(
                video_tokens, batch["input_ids"], batch["attention_mask"]
            )  # (B, K)
            key = "logits"
        else:
            logits = self.model.mc_scores_from_tokens(
                video_tokens, batch["input_ids"], batch["attention_mask"]
            )  # (B, C)
            key = "scores"
            if "candidate_mask" in batch:
                # (B, C) False for padding candidates (questions with fewer candidates than C): never chosen.
                logits = logits.masked_fill(~batch["candidate_mask"], float("-inf"))
        _check_targets(answer, logits.shape[1], self.model.cfg.answer_format)
        # CE in fp32: half-precision log-softmax over 1000 answers loses the small losses that the weighting
        # net reads.
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        parts = _Parts(F.cross_entropy(logits.to(dtype), answer, reduction="none"), logits, key)
        if "caption_ids" in batch:
            has_caption = batch.get("has_caption")
            if has_caption is None:
                has_caption = torch.ones(len(answer), dtype=torch.bool, device=answer.device)
            parts.video_emb = encoder.pool_video_tokens(video_tokens)  # (B, D)
            parts.text_emb = encoder.encode_text(batch["caption_ids"], batch["caption_mask"])  # (B, D)
            parts.has_caption = has_caption.bool()
        return parts

    @torch.no_grad()
    def cache_batch(self, micro_batches: Sequence[Mapping[str, Any]]) -> QACache:
        """Answer losses and embeddings of every micro-batch without gradients, stacked (n,) / (n, D)."""
        parts = [self._encode(mb) for mb in micro_batches]

        def stack(values: list[Tensor | None]) -> Tensor | None:
            return None if any(v is None for v in values) else torch.cat(values)  # type: ignore[arg-type]

        return QACache(
            torch.cat([p.answer_loss for p in parts]),
            stack([p.video_emb for p in parts]),
            stack([p.text_emb for p in parts]),
            stack([p.has_caption for p in parts]),
        )

    def cached_loss(self, cache: QACache) -> Tensor:
        """(n,) per-sample losses of the cached batch."""
        if cache.video_emb is None or cache.text_emb is None or cache.has_caption is None:
            return cache.answer_loss
        contrastive = self.contrastive_from_embeddings(cache.video_emb, cache.text_emb, cache.has_caption)
        return cache.answer_loss + self.contrastive_weight * contrastive

    def after_optimizer_step(self) -> None:
        self.logit_scale.clamp_()

    def contrastive_loss(
        self, video_emb: Tensor, caption_ids: Tensor, caption_mask: Tensor, has_caption: Tensor
    ) -> Tensor:
        """(B,) angular margin contrastive loss of (B, D) video embeddings against their captions
        ``caption_ids`` / ``caption_mask`` (B, Lc); see :meth:`contrastive_from_embeddings`."""
        text_emb = cast(TokenEncoder, self.model.encoder).encode_text(caption_ids, caption_mask)  # (B, D)
        return self.contrastive_from_embeddings(video_emb, text_emb, has_caption)

    def contrastive_from_embeddings(
        self, video_emb: Tensor, text_emb: Tensor, has_caption: Tensor, scale_grad: bool = True
    ) -> Tensor:
        """(B,) angular margin contrastive loss of (B, D) video against (B, D) caption embeddings.

        ``has_caption`` (B,) bool. Only captioned rows enter the loss, as anchors and as negatives (those
        of every rank under DDP); the others get 0.
        """
        has_caption = has_caption.bool()
        if has_caption.shape != (len(video_emb),):
            raise ValueError(f"has_caption must be ({len(video_emb)},), got {tuple(has_caption.shape)}")
        # Every rank gathers every step (collectives must match), even with no caption of its own.
        all_video, offset = gather_with_grad(video_emb)  # (world * B, D)
        all_text, _ = gather_with_grad(text_emb)
        all_has = gather_rows(has_caption.to(torch.uint8)).bool()  # (world * B,); uint8: gloo has no bool
        dtype = torch.float64 if video_emb.dtype == torch.float64 else torch.float32
        contrastive = torch.zeros(len(video_emb), dtype=dtype, device=video_emb.device)
        if not bool(all_has.any()):
            return contrastive  # same decision on every rank: all_has is global
        rows = has_caption.nonzero().squeeze(1)  # (n,) this rank's captioned rows
        logit_scale = self.logit_scale() if scale_grad else self.logit_scale().detach()
        loss = angular_margin_nce(
            video_emb[rows],
            text_emb[rows],
            logit_scale,
            self.margin,
            reduction="none",
            mode=self.mode,
            all_video_emb=all_video[all_has],
            all_text_emb=all_text[all_has],
            # This rank's captioned rows sit after those of the lower ranks.
            offset=int(all_has[:offset].sum()),
        )
        return contrastive.index_put((rows,), loss)


@dataclass
class _Parts:
    """What one forward of a batch computes before the losses are combined."""

    answer_loss: Tensor  # (B,)
    scores: Tensor  # (B, K) logits or (B, C) candidate scores
    score_key: str  # "logits" | "scores"
    video_emb: Tensor | None = None  # (B, D), when the batch has captions
    text_emb: Tensor | None = None  # (B, D)
    has_caption: Tensor | None = None  # (B,) bool


@dataclass
class QACache:
    """Gradient-free answer losses and embeddings of this rank's whole batch, for gradient accumulation;
    a re-encoded micro-batch replaces ``rows`` (so the contrastive negatives still span the batch)."""

    answer_loss: Tensor  # (n,)
    video_emb: Tensor | None  # (n, D), None when the batch has no captions
    text_emb: Tensor | None
    has_caption: Tensor | None  # (n,) bool
    rows: slice = field(default_factory=lambda: slice(0, 0))

    def splice(self, cached: Tensor, live: Tensor) -> Tensor:
        # (n, ...) with rows[start:stop] taken from the live micro-batch values.
        return torch.cat([cached[: self.rows.start], live.to(cached.dtype), cached[self.rows.stop :]])

    def at(self, rows: slice) -> QACache:
        return dataclasses.replace(self, rows=rows)


def _check_targets(answer: Tensor, num_classes: int, answer_format: str) -> None:
    if answer.ndim != 1:
        raise ValueError(f"answer must be (B,), got {tuple(answer.shape)}")
    bad = (answer < 0) | (answer >= num_classes)
    if bool(bad.any()):
        value = int(answer[bad][0])
        if answer_format == "open":
            raise ValueError(
                f"answer index {value} outside the {num_classes}-answer vocabulary: training samples whose answer is "
                "out of vocabulary (index -1) must be dropped by the dataset layer before they reach the task"
            )
        raise ValueError(f"correct candidate index {value} outside 0..{num_classes - 1}")
