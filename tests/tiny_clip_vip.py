"""Tiny random CLIP-ViP checkpoints written in the released layout, for offline tests of ``clip_vip``.

The layout is that of the authors' module tree (microsoft/XPretrain CLIP-ViP and its MAMA version in
nguyentthong/MAMA, ``text_video_retrieval/src/modeling/{VidCLIP,CLIP_ViP}.py``), written out here key by
key rather than derived from our model, so that loading it tests the converter against the real names:
``clipmodel.`` (the ``VidCLIP`` attribute), then transformers' ``CLIPModel`` names as their transformers
version saved them (``position_ids`` buffers and ``logit_scale`` included), CLIP-ViP's
``vision_model.embeddings.added_cls`` (K, W) and ``temporal_embedding`` (1, S, W), and in the MAMA version
the adapters ``self_attn.adaptmlp`` and ``mlp.adaptmlp_{1,2}`` of every layer of both towers.
"""

from __future__ import annotations

from pathlib import Path

import torch

PREFIX = "clipmodel."


def _adapter(prefix: str, width: int, hidden: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """The authors' Adapter(width, hidden) with adapter_layer_norm_option='in' and a float scale."""
    shapes = {
        "adapter_layer_norm_before.weight": (width,),
        "adapter_layer_norm_before.bias": (width,),
        "down_proj.weight": (hidden, width),
        "down_proj.bias": (hidden,),
        "up_proj.weight": (width, hidden),
        "up_proj.bias": (width,),
    }
    return {f"{prefix}.{name}": torch.randn(shape, generator=g) * 0.05 for name, shape in shapes.items()}


def released_state_dict(
    clip_folder: Path,
    add_cls_num: int = 3,
    temporal_size: int = 12,
    adapters: bool = False,
    adapter_dim: int = 8,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A random CLIP-ViP state dict in the released layout for the CLIP saved in ``clip_folder``."""
    from transformers import CLIPConfig

    config = CLIPConfig.from_pretrained(str(clip_folder))
    text, vision = config.text_config, config.vision_config
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {
        "logit_scale": (),
        "text_projection.weight": (config.projection_dim, text.hidden_size),
        "visual_projection.weight": (config.projection_dim, vision.hidden_size),
        "text_model.embeddings.token_embedding.weight": (text.vocab_size, text.hidden_size),
        "text_model.embeddings.position_embedding.weight": (text.max_position_embeddings, text.hidden_size),
        "text_model.final_layer_norm.weight": (text.hidden_size,),
        "text_model.final_layer_norm.bias": (text.hidden_size,),
    }
    num_positions = (vision.image_size // vision.patch_size) ** 2 + 1
    width = vision.hidden_size
    shapes.update(
        {
            "vision_model.embeddings.class_embedding": (width,),
            "vision_model.embeddings.added_cls": (add_cls_num, width),
            "vision_model.embeddings.patch_embedding.weight": (width, 3, vision.patch_size, vision.patch_size),
            "vision_model.embeddings.position_embedding.weight": (num_positions, width),
            "vision_model.embeddings.temporal_embedding": (1, temporal_size, width),
            "vision_model.pre_layrnorm.weight": (width,),
            "vision_model.pre_layrnorm.bias": (width,),
            "vision_model.post_layernorm.weight": (width,),
            "vision_model.post_layernorm.bias": (width,),
        }
    )
    state: dict[str, torch.Tensor] = {}
    for tower, tower_config in (("text_model", text), ("vision_model", vision)):
        w, inner = tower_config.hidden_size, tower_config.intermediate_size
        for i in range(tower_config.num_hidden_layers):
            layer = f"{tower}.encoder.layers.{i}"
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                shapes[f"{layer}.self_attn.{proj}.weight"] = (w, w)
                shapes[f"{layer}.self_attn.{proj}.bias"] = (w,)
            for norm in ("layer_norm1", "layer_norm2"):
                shapes[f"{layer}.{norm}.weight"] = (w,)
                shapes[f"{layer}.{norm}.bias"] = (w,)
            shapes[f"{layer}.mlp.fc1.weight"] = (inner, w)
            shapes[f"{layer}.mlp.fc1.bias"] = (inner,)
            shapes[f"{layer}.mlp.fc2.weight"] = (w, inner)
            shapes[f"{layer}.mlp.fc2.bias"] = (w,)
            if adapters:
                # Every layer of both towers holds all three (the image tower's attention adapter too).
                state.update(_adapter(f"{PREFIX}{layer}.self_attn.adaptmlp", w, adapter_dim, g))
                state.update(_adapter(f"{PREFIX}{layer}.mlp.adaptmlp_1", inner, adapter_dim, g))
                state.update(_adapter(f"{PREFIX}{layer}.mlp.adaptmlp_2", w, adapter_dim, g))
    for name, shape in shapes.items():
        scale = 1.0 if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layrnorm.weight")) else 0.0
        state[PREFIX + name] = scale + torch.randn(shape, generator=g) * 0.05
    state[PREFIX + "logit_scale"] = torch.tensor(4.6)
    # Buffers that the transformers of the authors' time saved with the weights.
    state[PREFIX + "text_model.embeddings.position_ids"] = torch.arange(text.max_position_embeddings)[None]
    state[PREFIX + "vision_model.embeddings.position_ids"] = torch.arange(num_positions)[None]
    return state


def save_released_checkpoint(path: Path, clip_folder: Path, **kwargs: object) -> Path:
    """``torch.save`` a :func:`released_state_dict` to ``path`` (as the authors' ModelSaver does)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(released_state_dict(clip_folder, **kwargs), path)  # type: ignore[arg-type]
    return path
