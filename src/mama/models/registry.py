"""Model registry and factory: configs pick a video-text model by name.

A registered model is a :class:`ModelSpec`: how to build its tokenizer from training captions (or load
it from a checkpoint), and how to build the model itself. Every model exposes
``encode_video(video (B, T, C, H, W)) -> (B, D)`` and ``encode_text(input_ids, attention_mask) -> (B, D)``
returning L2-normalised embeddings; models never compute losses.
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


@dataclass(frozen=True)
class ModelSpec:
    build_tokenizer: Callable[[ModelConfig, Iterable[str]], Any]
    load_tokenizer: Callable[[ModelConfig, Path], Any]
    build_model: Callable[[ModelConfig, Any], nn.Module]
    description: str = ""


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, spec: ModelSpec) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = spec


def list_models() -> list[str]:
    _import_builtin_models()
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    _import_builtin_models()
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


def _import_builtin_models() -> None:
    # Registration happens on first use, not at package import, so `import mama` stays cheap.
    from mama.models import dual_encoder  # noqa: F401
