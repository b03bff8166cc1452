"""Video-text models behind a registry: ``create_model(cfg, tokenizer)``, ``list_models()``; trained models
saved and reloaded as folders with ``save_pretrained`` / ``from_pretrained``."""

# Importing the model files registers the built-in models (as timm does): every import of mama.models or
# of one of its submodules runs this first, so the registry is complete before anyone can query it. Cheap:
# clip imports transformers only inside its functions, and `import mama` does not import mama.models.
from mama.models import clip, clip_vip, dual_encoder  # noqa: F401  registers them
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
