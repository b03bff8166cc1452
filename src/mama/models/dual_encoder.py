"""A small dual encoder that trains from scratch on a CPU.

Video is always (B, T, C, H, W), float, normalised. The video tower embeds each frame with a strided
conv stem whose spatial map is flattened (so the object's *position* survives: motion direction is only
visible as a change of position over frames), then a temporal transformer with a [CLS] token. The text
tower is a word-level transformer with a [CLS] token. Both end in a linear projection and return
L2-normalised embeddings.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mama.config import ConfigError, ModelConfig
from mama.models.layers import Block, run_blocks
from mama.models.pretrained import TOKENIZER_DIR, WEIGHTS_FILE, read_model_config
from mama.models.registry import ModelSpec, register_model
from mama.tokenizer import WordTokenizer


class VideoTower(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        stem_out = 4 * cfg.stem_channels
        self.stem = nn.Sequential(
            nn.Conv2d(3, cfg.stem_channels, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(cfg.stem_channels, 2 * cfg.stem_channels, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(2 * cfg.stem_channels, stem_out, 3, stride=2, padding=1),
            nn.GELU(),
        )
        grid = -(-cfg.frame_size // 8)  # three stride-2 convs with padding 1
        self.frame_proj = nn.Linear(stem_out * grid * grid, cfg.width)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos = nn.Parameter(torch.randn(1, cfg.max_frames + 1, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.video_layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.embed_dim)
        self.max_frames = cfg.max_frames
        self.grad_checkpointing = cfg.grad_checkpointing

    def forward(self, video: Tensor) -> Tensor:
        """video: (B, T, C, H, W) -> (B, D) unnormalised."""
        x = self.sequence(video)
        return self.head(self.norm(x[:, 0]))

    def sequence(self, video: Tensor) -> Tensor:
        """video: (B, T, C, H, W) -> (B, 1 + T, W): the temporal transformer's output ([CLS] first), before
        the final norm."""
        b, t = video.shape[:2]
        if t > self.max_frames:
            raise ValueError(f"{t} frames given, the model was built for at most {self.max_frames}")
        # (B, T, C, H, W) -> (B*T, C, H, W)
        feats = self.stem(video.flatten(0, 1))
        # (B*T, C', h, w) -> (B, T, C'*h*w): flatten keeps where the object is in the frame
        tokens = self.frame_proj(feats.flatten(1).view(b, t, -1))
        x = torch.cat([self.cls.expand(b, -1, -1), tokens], dim=1) + self.pos[:, : t + 1]
        return run_blocks(self.blocks, x, None, self.grad_checkpointing and self.training)


class TextTower(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.width)
        self.pos = nn.Parameter(torch.randn(1, cfg.max_text_length, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.text_layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.embed_dim)
        self.grad_checkpointing = cfg.grad_checkpointing

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: (B, L) with [CLS] first -> (B, D) unnormalised."""
        x = self.sequence(input_ids, attention_mask)
        return self.head(self.norm(x[:, 0]))

    def sequence(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: (B, L) -> (B, L, W): the transformer's output, before the final norm
        (rows at padded positions are meaningless: mask them with ``attention_mask``)."""
        length = input_ids.shape[1]
        x = self.embed(input_ids) + self.pos[:, :length]
        return run_blocks(self.blocks, x, attention_mask.bool(), self.grad_checkpointing and self.training)


class DualEncoder(nn.Module):
    """From-scratch video and text towers meeting in a shared ``embed_dim`` space."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.video = VideoTower(cfg)
        self.text = TextTower(cfg, vocab_size)
        # Widths of video_tokens / text_tokens (fusion models such as mama.qa read them).
        self.video_token_dim = cfg.width
        self.text_token_dim = cfg.width

    def encode_video(self, video: Tensor) -> Tensor:
        """video: (B, T, C, H, W) float -> (B, D) L2-normalised."""
        return F.normalize(self.video(video), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: (B, L) -> (B, D) L2-normalised."""
        return F.normalize(self.text(input_ids, attention_mask), dim=-1)

    def video_tokens(self, video: Tensor) -> Tensor:
        """video: (B, T, C, H, W) -> (B, 1 + T, W): the temporal transformer's sequence ([CLS] first) after
        its final norm, before the embedding head."""
        return self.video.norm(self.video.sequence(video))

    def pool_video_tokens(self, video_tokens: Tensor) -> Tensor:
        """(B, 1 + T, W) from :meth:`video_tokens` -> (B, D) L2-normalised: what :meth:`encode_video` gives
        for the same video, without running the video tower a second time."""
        return F.normalize(self.video.head(video_tokens[:, 0]), dim=-1)

    def text_tokens(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: (B, L) -> (B, L, W): the text transformer's normed sequence ([CLS]
        first; padded positions are meaningless)."""
        return self.text.norm(self.text.sequence(input_ids, attention_mask))


# Settings that shape the weights: a pretrained folder must agree with the config on each of them.
_ARCHITECTURE = (
    "embed_dim", "width", "heads", "video_layers", "text_layers", "stem_channels", "frame_size", "max_frames",
    "max_text_length",
)  # fmt: skip


def _build_tokenizer(cfg: ModelConfig, texts: Iterable[str]) -> WordTokenizer:
    if cfg.pretrained:
        # Fine-tuning keeps the vocabulary the model was pretrained with, as a pretrained CLIP keeps its BPE:
        # words it never saw map to [UNK].
        return WordTokenizer.load(Path(cfg.pretrained) / TOKENIZER_DIR)
    return WordTokenizer.build(texts, max_length=cfg.max_text_length)


def _load_tokenizer(cfg: ModelConfig, folder: Path) -> WordTokenizer:
    return WordTokenizer.load(folder)


def _build_model(cfg: ModelConfig, tokenizer: WordTokenizer) -> DualEncoder:
    return DualEncoder(cfg, vocab_size=len(tokenizer))


def _load_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Initialise from ``cfg.pretrained``: a folder written by :func:`mama.models.pretrained.save_pretrained`
    (``mama export``) from a ``tiny_dual_encoder`` with the same architecture settings; "" trains from scratch."""
    from safetensors.torch import load_file

    if not cfg.pretrained:
        return

    saved = read_model_config(cfg.pretrained)
    if saved.name != cfg.name:
        raise ConfigError(f"model.pretrained {cfg.pretrained}: holds a {saved.name!r} model, not {cfg.name!r}")
    differ = [
        f"{k} {getattr(saved, k)} (config: {getattr(cfg, k)})"
        for k in _ARCHITECTURE
        if getattr(saved, k) != getattr(cfg, k)
    ]
    if differ:
        raise ConfigError(f"model.pretrained {cfg.pretrained}: built with other settings: {'; '.join(differ)}")
    model.load_state_dict(load_file(str(Path(cfg.pretrained) / WEIGHTS_FILE)), strict=True)


register_model(
    "tiny_dual_encoder",
    ModelSpec(
        _build_tokenizer,
        _load_tokenizer,
        _build_model,
        "conv-stem + temporal transformer / word transformer",
        load_weights=_load_weights,
    ),
)
