"""Model registry and factory: configs pick a video-text model by name.

A registered model is a :class:`ModelSpec`: how to build its tokenizer from training captions (or load
it from a checkpoint), how to build the model itself, and, for pretrained backbones, how to load the
pretrained weights into a built model (construction and weight loading are separate). Every model exposes
``encode_video(video (B, T, C, H, W)) -> (B, D)`` and ``encode_text(input_ids, attention_mask) -> (B, D)``
returning L2-normalised embeddings; models never compute losses. Video enters as
``(uint8 / 255 - pixel_mean) / pixel_std`` per channel with the spec's mean and std.

The "tokenizer" object is the model's text-side asset: callable as ``tokenizer(texts) -> (input_ids,
attention_mask)`` and saved with ``tokenizer.save(folder)``; a pretrained backbone may keep there whatever
else it needs to be rebuilt offline (e.g. the backbone's own config).

A model may define ``backbone_prefixes``: parameter-name prefixes (relative to the model) of its
pretrained part, which train at ``optim.backbone_lr``.

This module is a leaf: it imports no model file (that would be an import cycle, as every model file
imports ``register_model`` from here). The built-in models register themselves when ``mama.models`` is
imported, which happens before any of its submodules, this one included, can be used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor, nn

if TYPE_CHECKING:
    from mama.config import ModelConfig


class Tokenizer(Protocol):
    def __call__(self, texts: list[str]) -> tuple[Tensor, Tensor]: ...
    def save(self, folder: Path) -> None: ...


class VideoTextModel(Protocol):
    """What every registered model (an ``nn.Module``) exposes; for typing, cast a model to it."""

    def encode_video(self, video: Tensor) -> Tensor: ...
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor: ...


class TokenEncoder(VideoTextModel, Protocol):
    """A model that can feed a QA fusion model (:class:`mama.models.qa.VideoQAModel`): token features too."""

    video_token_dim: int
    text_token_dim: int

    def video_tokens(self, video: Tensor) -> Tensor: ...
    def text_tokens(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor: ...
    def pool_video_tokens(self, video_tokens: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class ModelSpec:
    build_tokenizer: Callable[[ModelConfig, Iterable[str]], Any]
    load_tokenizer: Callable[[ModelConfig, Path], Any]
    build_model: Callable[[ModelConfig, Any], nn.Module]
    description: str = ""
    # Loads pretrained weights (cfg.pretrained) into a model built by build_model; None: trains from scratch.
    load_weights: Callable[[nn.Module, ModelConfig], None] | None = None
    pixel_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pixel_std: tuple[float, float, float] = (0.25, 0.25, 0.25)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, spec: ModelSpec) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = spec


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(sorted(_REGISTRY))}") from None


def create_tokenizer(cfg: ModelConfig, texts: Iterable[str]) -> Any:
    """Build the tokenizer of ``cfg.name`` (from the training captions where the model learns one)."""
    return get_spec(cfg.name).build_tokenizer(cfg, texts)


def load_tokenizer(cfg: ModelConfig, folder: Path) -> Any:
    return get_spec(cfg.name).load_tokenizer(cfg, Path(folder))


def create_model(cfg: ModelConfig, tokenizer: Any) -> nn.Module:
    """Construct (not load) the model named by ``cfg.name``; weights come from a checkpoint separately."""
    return get_spec(cfg.name).build_model(cfg, tokenizer)
