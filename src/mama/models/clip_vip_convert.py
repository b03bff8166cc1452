"""Load CLIP-ViP weights into the ``clip_vip`` model: the released checkpoints and plain OpenAI CLIPs.

The released CLIP-ViP checkpoints (microsoft/XPretrain, e.g. ``pretrain_clipvip_base_32.pt``) and the MAMA
authors' fine-tuned ones are ``torch.save``-d state dicts of their ``VidCLIP`` wrapper: every key starts with
``clipmodel.`` and continues with the module tree of transformers' ``CLIPModel`` plus CLIP-ViP's additions::

    clipmodel.vision_model.embeddings.added_cls               (K, W)     the K video proxy tokens
    clipmodel.vision_model.embeddings.temporal_embedding      (1, S, W)  S = temporal_size
    clipmodel.{text,vision}_model.encoder.layers.N.mlp.adaptmlp_{1,2}.*   adapters (MAMA's version only)
    clipmodel.text_model.encoder.layers.N.self_attn.adaptmlp.*            adapters (MAMA's version only)

``clip_vip`` keeps that tree under ``clip.`` (see :mod:`mama.models.clip_vip`), so converting is a change of
prefix plus dropping what the model does not hold:

- ``logit_scale``: the contrastive temperature belongs to the loss (``loss.init_logit_scale``);
- ``*.position_ids``: index buffers that transformers rebuilds and no longer saves;
- ``vision_model.encoder.layers.N.self_attn.adaptmlp.*``: the MAMA authors' code creates an adapter in the
  image tower's attention too, but its proxy-guided attention path never calls it (their weights are the
  initial ones), so ``clip_vip`` has no such module.

Anything else that does not match (a key missing or left over, a shape that differs) is an error that lists
every offending key, except one case the authors' own training starts from: a checkpoint without any adapter
(a released CLIP-ViP) loaded into a model with adapters, whose adapters then keep their initialisation.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

RELEASED_PREFIX = "clipmodel."  # VidCLIP's attribute holding the CLIPModel
ADAPTER_NAMES = ("adaptmlp", "adaptmlp_1", "adaptmlp_2")  # the authors' names of the adapter modules
# Parameters that CLIP-ViP adds to an OpenAI CLIP; with the adapters, what a plain CLIP checkpoint lacks.
VIP_PARAMETERS = ("vision_model.embeddings.added_cls", "vision_model.embeddings.temporal_embedding")

_ADAPTER = re.compile(r"\.(?:" + "|".join(ADAPTER_NAMES) + r")\.")
_UNUSED_VISION_ATTENTION_ADAPTER = re.compile(r"^vision_model\.encoder\.layers\.\d+\.self_attn\.adaptmlp\.")
_NESTED_STATE_KEYS = ("model_state_dict", "state_dict", "model")  # where training checkpoints keep the weights
_SHOWN = 20  # keys listed per kind in an error message


def is_adapter_key(name: str) -> bool:
    """Whether a parameter name (relative to the CLIPModel or to the model) belongs to an adapter."""
    return _ADAPTER.search(f".{name}") is not None


@dataclass
class LoadReport:
    """What a load did: keys copied, checkpoint keys dropped on purpose, model keys left at their init."""

    loaded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a checkpoint file: ``.safetensors``, or a ``torch.save``-d state dict (also nested
    under ``model_state_dict`` / ``state_dict`` / ``model``, as training checkpoints keep it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle of other objects, a truncated file, not a checkpoint at all
        raise ValueError(f"{path}: cannot read a state dict from this file: {exc}") from None
    for key in _NESTED_STATE_KEYS:
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    if not isinstance(loaded, Mapping) or not loaded:
        raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(loaded).__name__}")
    not_tensors = [str(k) for k, v in loaded.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise ValueError(f"{path}: not a state dict, these entries are not tensors: {_listing(not_tensors)}")
    return {str(k): v for k, v in loaded.items()}


def convert_released_state(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Keys of the released layout (``[module.]clipmodel.<CLIPModel key>``) -> keys relative to the model's
    ``clip`` attribute, and the released keys dropped on purpose (see the module docstring)."""
    converted: dict[str, Tensor] = {}
    dropped: list[str] = []
    for key, tensor in state.items():
        name = key.removeprefix("module.").removeprefix(RELEASED_PREFIX)
        if name == "logit_scale" or name.endswith("position_ids") or _UNUSED_VISION_ATTENTION_ADAPTER.match(name):
            dropped.append(key)
        else:
            converted[name] = tensor
    return converted, dropped


def load_released_checkpoint(clip: nn.Module, path: str | Path, hint: str = "") -> LoadReport:
    """Load a CLIP-ViP checkpoint file of the released layout into ``clip`` (the model's ``CLIPModel``).

    Raises ValueError listing the missing, unexpected and mis-shaped keys when it does not fit; ``hint``
    (the settings that shape the model) is added to that message.
    """
    state, dropped = convert_released_state(read_state_dict(path))
    expected = clip.state_dict()
    # A checkpoint without a single adapter (a released CLIP-ViP) may start the MAMA authors' adapters.
    fresh_adapters = not any(is_adapter_key(k) for k in state)
    may_miss = [k for k in expected if is_adapter_key(k)] if fresh_adapters else []
    report = _load_checked(clip, state, may_miss, f"{path}: does not fit this clip_vip model", hint)
    report.dropped = dropped
    return report


def load_plain_clip(clip: nn.Module, state: Mapping[str, Tensor], source: str, hint: str = "") -> LoadReport:
    """Load an OpenAI CLIP's state dict (``CLIPModel`` keys, no logit scale) into ``clip``; CLIP-ViP's own
    parameters (proxies, temporal embedding, adapters) keep their initialisation."""
    may_miss = [k for k in clip.state_dict() if k in VIP_PARAMETERS or is_adapter_key(k)]
    return _load_checked(clip, state, may_miss, f"{source}: this CLIP does not fit the clip_vip model", hint)


def _load_checked(
    clip: nn.Module, state: Mapping[str, Tensor], may_miss: Iterable[str], what: str, hint: str
) -> LoadReport:
    expected = clip.state_dict()
    allowed = set(may_miss)
    missing = [k for k in expected if k not in state and k not in allowed]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [what + (f" ({hint})" if hint else "") + ":"]
        for kind, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if keys:
                lines.append(f"  {kind} ({len(keys)}): {_listing(keys)}")
        raise ValueError("\n".join(lines))
    # strict=False: exactly the allowed keys are absent (checked above); they keep their initialisation.
    clip.load_state_dict(dict(state), strict=False)
    loaded = [k for k in expected if k in state]
    return LoadReport(loaded=loaded, initialised=[k for k in expected if k not in state])


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")
