"""Save a trained model as a self-contained folder and load it back, for every registered model.

A saved folder holds::

    config.json        {"mama_version": 1, "model": <ModelConfig as a dict>}
    model.safetensors  the model's state dict
    tokenizer/         the model's text-side asset (``tokenizer.save``), e.g. a pretrained backbone's config

so :func:`from_pretrained` rebuilds the model through the registry (``load_tokenizer`` + ``build_model``)
without training captions, a hub or the pretrained weights, then loads the saved state dict.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mama.config import ConfigError, ModelConfig, from_dict
from mama.fileio import set_default_mode
from mama.models.registry import create_model, load_tokenizer

MAMA_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


def _state_for_safetensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as contiguous tensors; entries sharing memory (tied weights) get their own copy,
    which safetensors requires and strict loading then restores one by one."""
    state: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and key in seen:
            tensor = tensor.clone()
        seen.add(key)
        state[name] = tensor.contiguous()
    return state


def save_pretrained(
    folder: str | Path, model_cfg: ModelConfig, model: nn.Module, tokenizer: Any, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``tokenizer/`` into ``folder``; returns ``folder``.

    ``extra``: more JSON-ready keys for ``config.json`` (e.g. the frames per video the model was trained
    with, which embedding needs); they cannot replace ``mama_version`` or ``model``.

    Atomic: everything is written into a temporary sibling folder first, and an existing ``folder`` is
    replaced only once the new one is complete, so an interrupted save never leaves a half-written model
    where a complete one was.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder}: exists and is not a folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        set_default_mode(tmp)  # mkdtemp and save_file are owner-only; a model is meant to be shared
        payload = {**(extra or {}), "mama_version": MAMA_VERSION, "model": dataclasses.asdict(model_cfg)}
        (tmp / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")
        save_file(_state_for_safetensors(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        set_default_mode(tmp / WEIGHTS_FILE)
        tokenizer.save(tmp / TOKENIZER_DIR)
        if folder.exists():
            # A directory cannot be renamed over a non-empty one: move the old one aside first, and delete it
            # only after the new one is in place (a crash in between leaves both, never neither).
            old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_model_config(folder: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` of a folder written by :func:`save_pretrained`, checked for completeness."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no saved model here (folder not found)")
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path, folder / TOKENIZER_DIR):
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing, {folder} is not a complete saved model")
    try:
        payload = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path}: invalid JSON: {exc}") from None
    if not isinstance(payload, dict) or payload.get("mama_version") != MAMA_VERSION or "model" not in payload:
        raise ValueError(f"{config_path}: not a mama model config (expected mama_version {MAMA_VERSION} and 'model')")
    try:
        return from_dict(ModelConfig, payload["model"], "model")
    except ConfigError as exc:
        raise ConfigError(f"{config_path}: {exc}") from None


def from_pretrained(folder: str | Path) -> tuple[ModelConfig, nn.Module, Any]:
    """Rebuild ``(model_cfg, model, tokenizer)`` saved by :func:`save_pretrained`; the model is in eval mode.

    Offline: the registry builds the model from the saved tokenizer asset and the saved state dict is
    loaded strictly (no pretrained weights are fetched).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    model_cfg = read_model_config(folder)
    tokenizer = load_tokenizer(model_cfg, folder / TOKENIZER_DIR)
    model = create_model(model_cfg, tokenizer)
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    return model_cfg, model.eval(), tokenizer
