"""Video-text models behind a registry: ``create_model(cfg, tokenizer)``, ``list_models()``."""

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
    "get_spec",
    "list_models",
    "load_tokenizer",
    "register_model",
]
