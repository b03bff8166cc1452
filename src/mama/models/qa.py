"""The video QA model: a fusion transformer over a video-text encoder's token features.

Video is always (B, T, C, H, W), float, normalised as the encoder expects. The encoder (a model from
:func:`mama.models.create_model`) provides ``video_tokens(video) -> (B, Nv, Dv)``,
``text_tokens(input_ids, attention_mask) -> (B, L, Dt)``, ``pool_video_tokens(video_tokens) -> (B, D)``
(= ``encode_video``), ``encode_text`` and the widths ``video_token_dim`` / ``text_token_dim``.

Both token sequences are projected to ``fusion_width``, tagged with a type embedding (video / text), and
a learned [CLS] is prepended; a joint transformer (the encoders' own pre-LN ``Block``) runs over the
concatenation with padded text keys masked out, and the [CLS] state answers the question - the
counterpart of VIOLET's answer prediction at a [MASK] token (as in the authors' VIOLETv2-based QA code):

- open-ended (``answer_format="open"``): an MLP head classifies the [CLS] state over the K most frequent
  training answers (:class:`mama.metrics.qa.AnswerVocab`);
- multiple choice (``answer_format="mc"``): every candidate is fused as its own text (question +
  candidate) with the same video, and a linear head scores its [CLS] state; the candidates of a sample
  compete in a softmax (in the task's loss).

Positions come from the encoder (the tiny dual encoder adds frame and word positions before its
transformers; CLIP's text tower has positions, its frame features have them only with seqTransf): the
fusion adds none of its own.

The model never computes losses (see :class:`mama.tasks.qa.module.QAModule`).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from mama.config import QAConfig
from mama.models.layers import Block, run_blocks
from mama.models.registry import TokenEncoder

ANSWER_FORMATS = ("open", "mc")


class VideoQAModel(nn.Module):
    """Encoder + fusion transformer + one answer head (see the module docstring)."""

    @property
    def backbone_prefixes(self) -> tuple[str, ...]:
        # A pretrained encoder's backbone trains at optim.backbone_lr here too.
        return tuple(f"encoder.{prefix}" for prefix in getattr(self.encoder, "backbone_prefixes", ()))

    def __init__(self, encoder: nn.Module, cfg: QAConfig):
        super().__init__()
        if cfg.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {cfg.answer_format!r}")
        if cfg.answer_format == "open" and cfg.num_answers < 1:
            raise ValueError(f"an open-ended QA model needs num_answers >= 1, got {cfg.num_answers}")
        if cfg.fusion_layers < 1:
            raise ValueError(f"fusion_layers must be >= 1, got {cfg.fusion_layers}")
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
        for attr in (
            "video_tokens",
            "text_tokens",
            "pool_video_tokens",
            "encode_text",
            "video_token_dim",
            "text_token_dim",
        ):
            if not hasattr(encoder, attr):
                raise TypeError(f"{type(encoder).__name__} has no {attr!r}: it cannot feed a QA fusion model")
        self.cfg = cfg
        self.encoder = encoder
        width = cfg.fusion_width
        # The LayerNorm puts both towers on one scale (CLIP's frame features are unnormalised projections).
        token_encoder = cast(TokenEncoder, encoder)  # has every attribute checked above
        video_dim, text_dim = token_encoder.video_token_dim, token_encoder.text_token_dim
        self.video_proj = nn.Sequential(nn.LayerNorm(video_dim), nn.Linear(video_dim, width))
        self.text_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, width))
        self.type_embed = nn.Parameter(torch.randn(2, width) * 0.02)  # row 0: video tokens, row 1: text tokens
        self.cls = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, cfg.fusion_heads) for _ in range(cfg.fusion_layers))
        self.norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(cfg.dropout)
        self.open_head: nn.Module | None = None
        self.mc_head: nn.Module | None = None
        if cfg.answer_format == "open":
            # The usual VQA classifier (UNITER / VIOLET): a 2x-wide hidden layer, then K answer logits.
            self.open_head = nn.Sequential(
                nn.Linear(width, 2 * width), nn.GELU(), nn.LayerNorm(2 * width), nn.Linear(2 * width, cfg.num_answers)
            )
        else:
            self.mc_head = nn.Linear(width, 1)

    @property
    def _token_encoder(self) -> TokenEncoder:
        # The encoder, typed by the interface that __init__ checked it for.
        return cast(TokenEncoder, self.encoder)

    def fuse_tokens(self, video_tokens: Tensor, text_tokens: Tensor, attention_mask: Tensor) -> Tensor:
        """Joint transformer over one video and one text per row.

        Args:
            video_tokens: (N, Nv, Dv) from ``encoder.video_tokens``.
            text_tokens: (N, L, Dt) from ``encoder.text_tokens``.
            attention_mask: (N, L), nonzero at real text tokens.

        Returns:
            (N, W) the final [CLS] state, W = ``fusion_width``.
        """
        return self._fuse_projected(self._project_video(video_tokens), text_tokens, attention_mask)

    def _project_video(self, video_tokens: Tensor) -> Tensor:
        """(N, Nv, Dv) -> (N, Nv, W) video tokens in the fusion space, typed."""
        return self.video_proj(video_tokens) + self.type_embed[0]

    def _fuse_projected(self, video: Tensor, text_tokens: Tensor, attention_mask: Tensor) -> Tensor:
        """video (N, Nv, W) from :meth:`_project_video`, text_tokens (N, L, Dt), attention_mask (N, L) -> (N, W)."""
        n, num_video = video.shape[:2]
        text = self.text_proj(text_tokens) + self.type_embed[1]  # (N, L, W)
        # (N, 1 + Nv + L, W): [CLS], video tokens, text tokens
        x = self.dropout(torch.cat([self.cls.expand(n, -1, -1), video, text], dim=1))
        # The [CLS] and every video token are real keys; padded text keys are masked out. The [CLS] key is
        # always present, so no row attends to nothing.
        keep = torch.ones(n, 1 + num_video, dtype=torch.bool, device=x.device)
        key_padding_mask = torch.cat([keep, attention_mask.bool()], dim=1)  # (N, 1 + Nv + L)
        x = run_blocks(self.blocks, x, key_padding_mask, recompute=False)
        return self.norm(x[:, 0])

    def fuse(self, video: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """video (B, T, C, H, W), input_ids / attention_mask (B, L) -> (B, W) fused [CLS] state."""
        text_tokens = self._token_encoder.text_tokens(input_ids, attention_mask)
        return self.fuse_tokens(self._token_encoder.video_tokens(video), text_tokens, attention_mask)

    def open_logits(self, video: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """video (B, T, C, H, W), question input_ids / attention_mask (B, L) -> (B, K) answer logits."""
        return self.open_logits_from_tokens(self._token_encoder.video_tokens(video), input_ids, attention_mask)

    def open_logits_from_tokens(self, video_tokens: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """As :meth:`open_logits` from precomputed ``video_tokens`` (B, Nv, Dv) -> (B, K)."""
        if self.open_head is None:
            raise RuntimeError("this QA model was built with answer_format='mc': it has no open-ended head")
        text_tokens = self._token_encoder.text_tokens(input_ids, attention_mask)
        return self.open_head(self.dropout(self.fuse_tokens(video_tokens, text_tokens, attention_mask)))

    def mc_scores(self, video: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """video (B, T, C, H, W), input_ids / attention_mask (B, C, L): each row the text of question +
        candidate c -> (B, C) scores (unnormalised; softmax over C). The video is encoded once per sample."""
        return self.mc_scores_from_tokens(self._token_encoder.video_tokens(video), input_ids, attention_mask)

    def mc_scores_from_tokens(self, video_tokens: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """As :meth:`mc_scores` from precomputed ``video_tokens`` (B, Nv, Dv) -> (B, C)."""
        if self.mc_head is None:
            raise RuntimeError("this QA model was built with answer_format='open': it has no multiple-choice head")
        if input_ids.ndim != 3 or input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"mc input_ids / attention_mask must both be (B, C, L), got {tuple(input_ids.shape)} "
                f"and {tuple(attention_mask.shape)}"
            )
        b, c, length = input_ids.shape
        if video_tokens.shape[0] != b:
            raise ValueError(f"{video_tokens.shape[0]} videos for {b} questions")
        # (B, C, L) -> (B*C, L): every candidate text is encoded on its own
        flat_mask = attention_mask.reshape(b * c, length)
        text_tokens = self._token_encoder.text_tokens(input_ids.reshape(b * c, length), flat_mask)  # (B*C, L, Dt)
        video = self._project_video(video_tokens)  # (B, Nv, W): encoded and projected once per sample
        num_video, width = video.shape[1:]
        # (B, Nv, W) -> (B, C, Nv, W) -> (B*C, Nv, W): each sample's video shared by its C candidates, in the
        # same sample-major order as the texts (the gradients of the C copies sum into the one encoding)
        shared_video = video[:, None].expand(b, c, num_video, width).reshape(b * c, num_video, width)
        fused = self._fuse_projected(shared_video, text_tokens, flat_mask)  # (B*C, W)
        # (B*C, 1) -> (B, C)
        return self.mc_head(self.dropout(fused)).view(b, c)
