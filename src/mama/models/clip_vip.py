"""CLIP-ViP (Xue et al., ICLR 2023), the video backbone of the MAMA authors' retrieval results, on
transformers' CLIP.

Video is always (B, T, C, H, W), float, normalised per channel with ``CLIP_MEAN`` / ``CLIP_STD``.

Unlike CLIP4Clip (:mod:`mama.models.clip`), the image tower sees the whole video as one token sequence::

    [CLS], P_1 .. P_K, patches of frame 1, ..., patches of frame T     M = 1 + K proxies, L patches a frame

- the K video proxy tokens (``model.add_cls_num``) are learned vectors; they and [CLS] get the position
  embedding of CLIP's [CLS] slot;
- a patch token is CLIP's patch embedding plus its spatial position embedding plus the learned temporal
  embedding of its frame (``model.temporal_size`` entries, linearly interpolated when T differs);
- proxy-guided attention in every layer: the patches of a frame attend to the M proxies and to the patches
  of their own frame; the proxies attend to every token (:func:`proxy_guided_attention`);
- the video embedding is the final [CLS] state after CLIP's post layer norm and visual projection.

With one frame, no proxy besides [CLS], no temporal embedding and no adapters this is exactly CLIP's image
tower. The text tower is CLIP's own.

``model.adapters`` adds the bottleneck adapters of the MAMA authors' version of CLIP-ViP
(``text_video_retrieval/src/modeling/CLIP_ViP.py`` in nguyentthong/MAMA): ``x + up(relu(down(LN(x))))`` with
a zero-initialised ``up``, so a fresh adapter is the identity. As in their code they transform the outputs
of ``fc1`` and ``fc2`` in the MLP of every layer of both towers, and the output projection of the text
tower's attention (their image tower also holds an attention adapter that its proxy-guided path never
calls; it is left out here).

Parameter names follow the authors' module tree under ``clip.`` (theirs is ``clipmodel.``):
``clip.vision_model.embeddings.added_cls`` (K, W), ``clip.vision_model.embeddings.temporal_embedding``
(1, temporal_size, W), ``...mlp.adaptmlp_1`` / ``...mlp.adaptmlp_2`` / ``...self_attn.adaptmlp``; the
released checkpoints load through :mod:`mama.models.clip_vip_convert`. The adapters hang off transformers'
layers as sub-modules under those names and run as forward hooks on the linear layer they follow, so
transformers' own text-tower forward (attention kernels, masks, gradient checkpointing) runs unchanged.

``transformers`` is imported inside the functions that need it, so listing the registry works without it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mama.config import ModelConfig
from mama.models.clip import CLIP_MEAN, CLIP_STD, CLIPTextAsset, CLIPTextTower, pretrained_clip_state
from mama.models.clip_vip_convert import is_adapter_key, load_plain_clip, load_released_checkpoint
from mama.models.layers import holds_computed_parameters
from mama.models.registry import ModelSpec, register_model

if TYPE_CHECKING:
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer


class Adapter(nn.Module):
    """Bottleneck adapter of the MAMA authors' CLIP-ViP: (..., width) -> (..., width), ``x + up(relu(down(LN(x))))``.

    Initialised as theirs: LayerNorm at (1, 0), ``down`` with PyTorch's default Linear weight draw and a zero
    bias, ``up`` all zeros, so the adapter starts as the identity. Sub-module names are the authors'.
    """

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.adapter_layer_norm_before = nn.LayerNorm(width)
        self.down_proj = nn.Linear(width, hidden)
        self.up_proj = nn.Linear(hidden, width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.adapter_layer_norm_before.reset_parameters()
        nn.init.kaiming_uniform_(self.down_proj.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down_proj.bias)
        nn.init.zeros_(self.up_proj.weight)
        nn.init.zeros_(self.up_proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up_proj(F.relu(self.down_proj(self.adapter_layer_norm_before(x))))

    def transform_output(self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor:
        """Forward hook: the adapter applied to the output of the layer it follows."""
        return self(output)


def attach_adapters(layer: CLIPEncoderLayer, hidden: int, attention: bool) -> None:
    """Add the authors' adapters to one of transformers' CLIP encoder layers: after ``mlp.fc1``
    (``mlp.adaptmlp_1``, on the intermediate width), after ``mlp.fc2`` (``mlp.adaptmlp_2``) and, with
    ``attention``, after ``self_attn.out_proj`` (``self_attn.adaptmlp``)."""
    sites: list[tuple[nn.Module, str, nn.Linear]] = [
        (layer.mlp, "adaptmlp_1", layer.mlp.fc1),
        (layer.mlp, "adaptmlp_2", layer.mlp.fc2),
    ]
    if attention:
        sites.append((layer.self_attn, "adaptmlp", layer.self_attn.out_proj))
    for owner, name, linear in sites:
        adapter = Adapter(linear.out_features, hidden)
        owner.add_module(name, adapter)
        linear.register_forward_hook(adapter.transform_output)


def proxy_guided_attention(
    query: Tensor, key: Tensor, value: Tensor, num_proxies: int, num_frames: int, dropout_p: float = 0.0,
    scale: float | None = None,
) -> Tensor:  # fmt: skip
    """CLIP-ViP's attention over a video token sequence.

    Args:
        query, key, value: (B, H, M + T*L, d), tokens ordered as the M proxies ([CLS] first), then the L
            patches of frame 1, ..., of frame T.
        num_proxies: M. num_frames: T.

    Returns:
        (B, H, M + T*L, d). A proxy attends to every token; a patch of frame t attends to the M proxies and
        the L patches of frame t. The same as one attention under that block mask, without its
        (M + T*L)^2 scores a head (2356^2 for ViT-B/16 at 12 frames).
    """
    b, h, n, d = query.shape
    m, t = num_proxies, num_frames
    per_frame = (n - m) // t
    if m + t * per_frame != n:
        raise ValueError(f"{n} tokens are not {m} proxies plus {t} frames of equally many patches")
    proxies = F.scaled_dot_product_attention(query[:, :, :m], key, value, dropout_p=dropout_p, scale=scale)

    def frames(x: Tensor) -> Tensor:
        # (B, H, M + T*L, d) -> (B, H*T, L, d): one attention batch row per head and frame
        return x[:, :, m:].reshape(b, h * t, per_frame, d)

    def proxies_then_frame(x: Tensor) -> Tensor:
        # (B, H, M, d) -> (B, H, T, M, d) -> (B, H*T, M, d), then each frame's own patches: (B, H*T, M + L, d)
        shared = x[:, :, None, :m].expand(b, h, t, m, d).reshape(b, h * t, m, d)
        return torch.cat([shared, frames(x)], dim=2)

    patches = F.scaled_dot_product_attention(
        frames(query), proxies_then_frame(key), proxies_then_frame(value), dropout_p=dropout_p, scale=scale
    )
    # (B, H*T, L, d) -> (B, H, T*L, d)
    return torch.cat([proxies, patches.reshape(b, h, t * per_frame, d)], dim=2)


def proxy_guided_layer(layer: CLIPEncoderLayer, hidden: Tensor, num_proxies: int, num_frames: int) -> Tensor:
    """One of transformers' CLIP encoder layers (its weights, its pre-LN residual layout) with proxy-guided
    attention: hidden (B, M + T*L, W) -> (B, M + T*L, W). Its MLP runs through the module, adapters included."""
    attn = layer.self_attn
    b, n, width = hidden.shape
    x = layer.layer_norm1(hidden)
    # (B, N, W) -> (B, heads, N, head_dim)
    q, k, v = (
        p(x).view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj)
    )
    dropout_p = float(attn.dropout or 0.0) if layer.training else 0.0  # CLIP's attention_dropout (0 in OpenAI's)
    out = proxy_guided_attention(q, k, v, num_proxies, num_frames, dropout_p=dropout_p, scale=attn.scale)
    # (B, heads, N, head_dim) -> (B, N, W)
    hidden = hidden + attn.out_proj(out.transpose(1, 2).reshape(b, n, width))
    return hidden + layer.mlp(layer.layer_norm2(hidden))


class CLIPViP(CLIPTextTower):
    """CLIP-ViP video tower (proxy tokens, proxy-guided attention) and CLIP's text tower; optional adapters."""

    def __init__(self, cfg: ModelConfig, clip_config: CLIPConfig):
        super().__init__()
        from transformers import CLIPModel

        vision_config = cast("CLIPVisionConfig", clip_config.vision_config)
        text_config = cast("CLIPTextConfig", clip_config.text_config)
        image_size = vision_config.image_size
        if cfg.frame_size != image_size:
            raise ValueError(
                f"model.frame_size={cfg.frame_size} but the CLIP vision tower takes {image_size}x{image_size} "
                f"frames: set model.frame_size={image_size} (and data.frame_size to match)"
            )
        # SDPA for the text tower, as in mama.models.clip; the image tower's attention is our own (below).
        self.clip = CLIPModel._from_config(copy.deepcopy(clip_config), attn_implementation="sdpa")
        # The contrastive temperature belongs to the loss (loss.init_logit_scale); see mama.models.clip.
        del self.clip.logit_scale
        width = vision_config.hidden_size
        embeddings = self.clip.vision_model.embeddings
        # Initialised as in the authors' code: a standard normal draw for the proxies (pre_layrnorm puts
        # every token on CLIP's scale), zeros for the temporal embedding (a plain CLIP at step 0).
        if cfg.add_cls_num > 0:
            embeddings.register_parameter("added_cls", nn.Parameter(torch.randn(cfg.add_cls_num, width)))
        if cfg.temporal_embed:
            embeddings.register_parameter("temporal_embedding", nn.Parameter(torch.zeros(1, cfg.temporal_size, width)))
        if cfg.adapters:
            for layer in self.clip.text_model.encoder.layers:
                attach_adapters(layer, cfg.adapter_dim, attention=True)
            for layer in self.clip.vision_model.encoder.layers:
                attach_adapters(layer, cfg.adapter_dim, attention=False)
        if cfg.grad_checkpointing:
            # transformers' checkpointing for the text tower (non-reentrant, so the meta step can still
            # differentiate twice); the image tower's layers are recomputed by video_hidden_states.
            self.clip.text_model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        self.num_proxies = 1 + cfg.add_cls_num  # M: [CLS] and the learned proxies
        self.max_frames = cfg.max_frames
        self.frame_size = image_size
        self.grad_checkpointing = cfg.grad_checkpointing
        # Widths of video_tokens (image tower states) / text_tokens (text tower states).
        self.video_token_dim = width
        self.text_token_dim = text_config.hidden_size
        # The pretrained part (trains at optim.backbone_lr): every CLIP-ViP parameter except the new adapters.
        self.backbone_prefixes: tuple[str, ...] = tuple(
            f"clip.{name}" for name, _ in self.clip.named_parameters() if not is_adapter_key(name)
        )

    def temporal_embedding(self, num_frames: int) -> Tensor | None:
        """(1, T, W): the learned temporal embedding, linearly interpolated from ``temporal_size`` entries
        when T differs (``align_corners=False``, as the authors); None when the model has none."""
        table = cast("Tensor | None", getattr(self.clip.vision_model.embeddings, "temporal_embedding", None))
        if table is None or num_frames == table.shape[1]:
            return table
        # (1, S, W) -> (1, W, S) -> (1, W, T) -> (1, T, W)
        return F.interpolate(table.transpose(1, 2), size=num_frames, mode="linear").transpose(1, 2)

    def embed_video(self, video: Tensor) -> Tensor:
        """video (B, T, C, H, W) -> (B, M + T*L, W): [CLS], the proxies, then every frame's patch tokens."""
        embeddings = self.clip.vision_model.embeddings
        b, t = video.shape[:2]
        conv = embeddings.patch_embedding
        # (B, T, C, H, W) -> (B*T, C, H, W) -> (B*T, W, g, g) -> (B*T, L, W)
        patches = conv(video.flatten(0, 1).to(conv.weight.dtype)).flatten(2).transpose(1, 2)
        patches = patches.reshape(b, t, -1, patches.shape[-1])  # (B*T, L, W) -> (B, T, L, W)
        position = embeddings.position_embedding.weight  # (1 + L, W): row 0 is [CLS]'s slot
        time = self.temporal_embedding(t)
        if time is not None:
            patches = patches + time[:, :, None]  # (1, T, 1, W)
        patches = patches + position[1:]
        proxies = embeddings.class_embedding[None]  # (1, W)
        added = cast("Tensor | None", getattr(embeddings, "added_cls", None))
        if added is not None:
            proxies = torch.cat([proxies, added])  # (M, W)
        proxies = (proxies + position[0]).expand(b, -1, -1)  # (B, M, W)
        # (B, T, L, W) -> (B, T*L, W), frame after frame
        return torch.cat([proxies, patches.flatten(1, 2)], dim=1)

    def video_hidden_states(self, video: Tensor) -> Tensor:
        """video (B, T, C, H, W) -> (B, M + T*L, W): the image tower's last hidden states (before its post
        layer norm), in the token order of :meth:`embed_video`."""
        t, _, h, w = video.shape[1:]
        if t > self.max_frames:
            raise ValueError(f"{t} frames given, the model was built for at most {self.max_frames}")
        if (h, w) != (self.frame_size, self.frame_size):
            raise ValueError(f"frames are {h}x{w}, the CLIP vision tower takes {self.frame_size}x{self.frame_size}")
        vision = self.clip.vision_model
        x = vision.pre_layrnorm(self.embed_video(video))
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for layer in cast("Iterable[CLIPEncoderLayer]", vision.encoder.layers):
            if recompute and not holds_computed_parameters(layer):
                # Non-reentrant: the meta step's double backward goes through the recomputation.
                x = checkpoint(proxy_guided_layer, layer, x, self.num_proxies, t, use_reentrant=False)
            else:
                x = proxy_guided_layer(layer, x, self.num_proxies, t)
        return x

    def video_tokens(self, video: Tensor) -> Tensor:
        """video (B, T, C, H, W) -> (B, M + T, W) after the post layer norm: the final states of [CLS] (row 0)
        and the proxies, then per frame the mean of its patch states; not projected, not normalised."""
        hidden = self.video_hidden_states(video)
        b, t, m = hidden.shape[0], video.shape[1], self.num_proxies
        # (B, T*L, W) -> (B, T, L, W) -> (B, T, W)
        frames = hidden[:, m:].reshape(b, t, -1, hidden.shape[-1]).mean(dim=2)
        return self.clip.vision_model.post_layernorm(torch.cat([hidden[:, :m], frames], dim=1))

    def pool_video_tokens(self, video_tokens: Tensor) -> Tensor:
        """(B, M + T, W) from :meth:`video_tokens` -> (B, D) L2-normalised: the projected [CLS]."""
        return F.normalize(self.clip.visual_projection(video_tokens[:, 0]), dim=-1)

    def encode_video(self, video: Tensor) -> Tensor:
        """video: (B, T, C, H, W) float, CLIP-normalised -> (B, D) L2-normalised, D = CLIP projection dim."""
        return self.pool_video_tokens(self.video_tokens(video))


def _settings(cfg: ModelConfig) -> str:
    """The settings that shape a clip_vip model, for error messages about checkpoints that do not fit."""
    return (
        f"model.add_cls_num={cfg.add_cls_num}, model.temporal_embed={cfg.temporal_embed}, "
        f"model.temporal_size={cfg.temporal_size}, model.adapters={cfg.adapters}, model.adapter_dim={cfg.adapter_dim}, "
        f"CLIP config from {cfg.clip_config or cfg.pretrained!r}"
    )


def _asset_source(cfg: ModelConfig) -> str:
    """Where the CLIP config and tokenizer come from: ``model.clip_config``, else ``model.pretrained``."""
    if cfg.clip_config:
        return cfg.clip_config
    if not cfg.pretrained:
        raise ValueError(
            "model 'clip_vip' needs model.pretrained: an OpenAI CLIP (hub id such as openai/clip-vit-base-patch32, "
            "or a local folder with a CLIPModel and its tokenizer), or a CLIP-ViP checkpoint file together with "
            "model.clip_config"
        )
    if Path(cfg.pretrained).is_file():
        raise ValueError(
            f"model.pretrained={cfg.pretrained!r} is a checkpoint file, which holds no CLIP config or tokenizer: "
            "set model.clip_config to the CLIP it was trained from (e.g. openai/clip-vit-base-patch32 for CLIP-ViP "
            "B/32, openai/clip-vit-base-patch16 for B/16), a hub id or a local folder"
        )
    return cfg.pretrained


def _build_tokenizer(cfg: ModelConfig, texts: Iterable[str]) -> CLIPTextAsset:
    """CLIP's tokenizer and config (the captions are not needed)."""
    return CLIPTextAsset.from_pretrained(_asset_source(cfg), cfg.max_text_length)


def _load_tokenizer(cfg: ModelConfig, folder: Path) -> CLIPTextAsset:
    return CLIPTextAsset.load(folder, cfg.max_text_length)


def _build_model(cfg: ModelConfig, tokenizer: CLIPTextAsset) -> CLIPViP:
    """Random weights from the CLIP config held by ``tokenizer``; :func:`_load_weights` loads the real ones."""
    if not isinstance(tokenizer, CLIPTextAsset):
        raise TypeError(f"model 'clip_vip' needs the tokenizer built for it, got {type(tokenizer).__name__}")
    return CLIPViP(cfg, tokenizer.clip_config)


def _load_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """``model.pretrained`` into ``model.clip``: a CLIP-ViP checkpoint file (released layout, converted), or
    an OpenAI CLIP (hub id or folder) whose missing CLIP-ViP parameters keep their initialisation."""
    if not isinstance(model, CLIPViP):
        raise TypeError(f"expected a CLIPViP, got {type(model).__name__}")
    if not cfg.pretrained:
        raise ValueError("model.pretrained is empty: no pretrained weights to load")
    if Path(cfg.pretrained).is_file():
        load_released_checkpoint(model.clip, cfg.pretrained, hint=_settings(cfg))
    else:
        load_plain_clip(model.clip, pretrained_clip_state(cfg.pretrained), cfg.pretrained, hint=_settings(cfg))


register_model(
    "clip_vip",
    ModelSpec(
        _build_tokenizer,
        _load_tokenizer,
        _build_model,
        "CLIP-ViP (video proxy tokens, proxy-guided attention) on transformers' CLIP, optional MAMA adapters",
        load_weights=_load_weights,
        pixel_mean=CLIP_MEAN,
        pixel_std=CLIP_STD,
    ),
)
