"""Video-text models behind a registry: ``create_model(cfg, tokenizer)``, ``list_models()``; trained models
saved and reloaded as folders with ``save_pretrained`` / ``from_pretrained``."""

from mama.models.pretrained import from_pretrained, save_pretrained
from mama.models.registry import (
    ModelSpec,
    create_model,
    create_tokenizer,
    get_spec,
    list_models,
    load_tokenizer,
    register_model,
)

__all__ = [
    "ModelSpec",
    "create_model",
    "create_tokenizer",
    "from_pretrained",
    "get_spec",
    "list_models",
    "load_tokenizer",
    "register_model",
    "save_pretrained",
]
