"""A pretrained CLIP video-text backbone through Hugging Face transformers (CLIP4Clip meanP / seqTransf).

Video is always (B, T, C, H, W), float, normalised per channel with :data:`CLIP_MEAN` / :data:`CLIP_STD`.
Every frame goes through CLIP's image tower on its own; the per-frame embeddings are then aggregated over
time, as in CLIP4Clip (Luo et al., 2021):

- ``meanP``: mean of the L2-normalised frame embeddings;
- ``seqTransf``: learned frame position embeddings and a small temporal transformer whose output is added
  back to the frame embeddings as a residual, then the same mean.

Text goes through CLIP's text tower, which pools the hidden state at the first EOS token. Both return
L2-normalised embeddings of CLIP's projection dimension; ``cfg.embed_dim``, ``width``, ``heads`` and the
layer counts of the from-scratch model do not apply (the pretrained CLIP config fixes the sizes).

``transformers`` is imported inside the functions that need it, so listing the registry (and every
from-scratch model) works without it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mama.config import ModelConfig
from mama.models.layers import Block, holds_computed_parameters, run_blocks
from mama.models.registry import ModelSpec, register_model

if TYPE_CHECKING:
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

# OpenAI CLIP's pixel statistics (RGB, on 0..1 pixels): the pretrained towers expect frames normalised so.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

TEMPORAL_MODES = ("meanP", "seqTransf")

# Older CLIP configs on the hub (openai/clip-vit-*) say eos_token_id=2; for those transformers pools the
# text at the *largest* token id instead of at the EOS id (see CLIPTextTransformer.forward).
_LEGACY_EOS_ID = 2


def _require_pretrained(cfg: ModelConfig) -> str:
    if not cfg.pretrained:
        raise ValueError(
            f"model {cfg.name!r} needs model.pretrained: a Hugging Face hub id (e.g. openai/clip-vit-base-patch32) "
            "or a local folder holding a CLIPModel and its tokenizer"
        )
    return cfg.pretrained


def _check_folder(folder: Path, what: str) -> None:
    # Without this, transformers would take a missing local folder for a hub id and fail far less clearly.
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no {what} saved here (folder not found)")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'config.json'}: no CLIP config saved here")


class CLIPTextAsset:
    """CLIP's tokenizer plus the CLIP config: everything needed to rebuild the model without the hub.

    Callable as ``asset(texts) -> (input_ids, attention_mask)``, both int64 (B, L) with
    L = ``max_length``: ``<bos> tokens <eos> <pad>...``, truncated so that the last real token is the EOS
    (CLIP's text tower pools the hidden state there).
    """

    def __init__(self, hf_tokenizer: Any, clip_config: CLIPConfig, max_length: int):
        # CLIPConfig turns its sub-configs into config objects; transformers annotates them as dict | ... | None.
        text_config = cast("CLIPTextConfig", clip_config.text_config)
        if not 2 <= max_length <= text_config.max_position_embeddings:
            raise ValueError(
                f"max_text_length {max_length} must be in [2, {text_config.max_position_embeddings}] "
                "(the CLIP text tower's max_position_embeddings)"
            )
        eos_id = hf_tokenizer.eos_token_id
        if eos_id is None:
            raise ValueError("the CLIP tokenizer has no eos_token: CLIP's text pooling needs one")
        if text_config.eos_token_id == _LEGACY_EOS_ID:
            # Legacy configs pool at argmax(input_ids): only right if EOS has the largest id (as in OpenAI's BPE).
            if eos_id != len(hf_tokenizer) - 1:
                raise ValueError(
                    f"the CLIP config has the legacy eos_token_id=2, so text is pooled at the largest token id, "
                    f"but the tokenizer's EOS id {eos_id} is not the largest ({len(hf_tokenizer) - 1})"
                )
        elif eos_id != text_config.eos_token_id:
            raise ValueError(
                f"tokenizer EOS id {eos_id} differs from the CLIP text config's eos_token_id "
                f"{text_config.eos_token_id}: the text tower would pool at the wrong token"
            )
        self.hf_tokenizer = hf_tokenizer
        self.clip_config = clip_config
        self.max_length = max_length
        self.eos_id = int(eos_id)

    def __len__(self) -> int:
        return len(self.hf_tokenizer)

    def __call__(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Returns ``input_ids`` (B, L) int64 and ``attention_mask`` (B, L) int64 (1 for real tokens)."""
        enc = self.hf_tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        input_ids = enc["input_ids"].long()
        attention_mask = enc["attention_mask"].long()
        # The tokenizer truncates the words, not the special tokens, so the EOS survives truncation; a
        # tokenizer that adds no EOS would make CLIP pool at an arbitrary token, silently.
        last = attention_mask.sum(dim=1) - 1
        last_token = input_ids[torch.arange(len(input_ids)), last.clamp(min=0)]
        if (last_token != self.eos_id).any():
            bad = int((last_token != self.eos_id).nonzero()[0, 0])
            raise ValueError(f"tokenized caption {bad} ({texts[bad]!r}) does not end with the EOS token {self.eos_id}")
        return input_ids, attention_mask

    def save(self, folder: Path) -> None:
        """Write the Hugging Face tokenizer files and the CLIP ``config.json`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.hf_tokenizer.save_pretrained(str(folder))
        self.clip_config.save_pretrained(str(folder))

    @classmethod
    def from_pretrained(cls, source: str, max_length: int) -> CLIPTextAsset:
        """CLIP's own tokenizer and config from ``source``: a Hugging Face hub id or a local folder holding a
        CLIP config and its tokenizer (the weights are not read)."""
        from transformers import AutoConfig, AutoTokenizer, CLIPConfig

        if Path(source).exists():
            _check_folder(Path(source), "CLIP model")
        clip_config = AutoConfig.from_pretrained(source)
        if not isinstance(clip_config, CLIPConfig):
            raise TypeError(f"{source}: expected a CLIP model config, got {type(clip_config).__name__}")
        return cls(AutoTokenizer.from_pretrained(source), clip_config, max_length)

    @classmethod
    def load(cls, folder: Path, max_length: int) -> CLIPTextAsset:
        """Read back what :meth:`save` wrote (offline: no hub access)."""
        from transformers import AutoTokenizer, CLIPConfig

        folder = Path(folder)
        _check_folder(folder, "CLIP tokenizer")
        clip_config = CLIPConfig.from_pretrained(str(folder))
        return cls(AutoTokenizer.from_pretrained(str(folder)), clip_config, max_length)


def _temporal_heads(dim: int) -> int:
    """CLIP4Clip's head width of 64: ``dim // 64`` heads, lowered until it divides ``dim``."""
    heads = max(1, dim // 64)
    while dim % heads:
        heads -= 1
    return heads


class CLIPTextTower(nn.Module):
    """CLIP's text tower as the text side of a video model: ``self.clip`` is a transformers ``CLIPModel``
    (shared by ``clip`` and ``clip_vip``, whose text towers are CLIP's own)."""

    clip: CLIPModel
    grad_checkpointing: bool

    def _checkpoint_real_layers_only(self, layers: Iterable[nn.Module]) -> None:
        """transformers decides per call, from each encoder layer's flag, whether to recompute it in
        backward: recompute only the layers running on their own weights, never one running on the meta
        step's virtual parameters (see :func:`mama.models.layers.holds_computed_parameters`)."""
        if self.grad_checkpointing:
            for layer in layers:
                cast(Any, layer).gradient_checkpointing = not holds_computed_parameters(layer)

    def text_tokens(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: (B, L) -> (B, L, text hidden size): the text tower's last_hidden_state
        (after its final layer norm, before pooling and projection; padded positions are meaningless)."""
        self._checkpoint_real_layers_only(self.clip.text_model.encoder.layers)
        return self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: (B, L) ending in EOS then padding -> (B, D) L2-normalised."""
        self._checkpoint_real_layers_only(self.clip.text_model.encoder.layers)
        text_emb = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return F.normalize(text_emb, dim=-1)


class CLIPVideoText(CLIPTextTower):
    """CLIP image and text towers; frames aggregated by ``meanP`` or ``seqTransf`` (CLIP4Clip)."""

    # The pretrained part (trains at optim.backbone_lr); the temporal transformer is new.
    backbone_prefixes: tuple[str, ...] = ("clip.",)

    def __init__(self, cfg: ModelConfig, clip_config: CLIPConfig):
        super().__init__()
        from transformers import CLIPModel

        if cfg.temporal not in TEMPORAL_MODES:
            raise ValueError(f"model.temporal must be one of {TEMPORAL_MODES}, got {cfg.temporal!r}")
        vision_config = cast("CLIPVisionConfig", clip_config.vision_config)
        text_config = cast("CLIPTextConfig", clip_config.text_config)
        image_size = vision_config.image_size
        if cfg.frame_size != image_size:
            raise ValueError(
                f"model.frame_size={cfg.frame_size} but the CLIP vision tower takes {image_size}x{image_size} "
                f"frames: set model.frame_size={image_size} (and data.frame_size to match)"
            )
        if cfg.temporal == "seqTransf" and cfg.temporal_layers < 1:
            raise ValueError(f"seqTransf needs model.temporal_layers >= 1, got {cfg.temporal_layers}")
        # SDPA: fast kernels in ordinary steps; the meta step's second-order gradients run under
        # sdpa_kernel([SDPBackend.MATH]), which differentiates twice (the CPU flash kernel cannot).
        self.clip = CLIPModel._from_config(copy.deepcopy(clip_config), attn_implementation="sdpa")
        # The contrastive temperature belongs to the loss (loss.init_logit_scale). Left here it would be a
        # parameter without gradient: DDP waits for it forever and the optimiser decays it for nothing.
        del self.clip.logit_scale
        if cfg.grad_checkpointing:
            # Both towers' encoder layers; non-reentrant so the meta step can still differentiate twice.
            self.clip.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

        self.temporal = cfg.temporal
        self.max_frames = cfg.max_frames
        self.frame_size = image_size
        self.grad_checkpointing = cfg.grad_checkpointing
        dim = clip_config.projection_dim
        assert dim is not None, "the CLIP config has no projection_dim"
        # Widths of video_tokens (per-frame projected features) / text_tokens (text tower hidden states).
        self.video_token_dim = dim
        self.text_token_dim = text_config.hidden_size
        self.frame_pos: nn.Parameter | None = None
        self.temporal_blocks: nn.ModuleList | None = None
        if cfg.temporal == "seqTransf":
            self.frame_pos = nn.Parameter(torch.randn(1, cfg.max_frames, dim) * 0.02)
            self.temporal_blocks = nn.ModuleList(Block(dim, _temporal_heads(dim)) for _ in range(cfg.temporal_layers))
            for block in cast("Iterable[Block]", self.temporal_blocks):
                # Zero output projections make every block the identity at step 0, so seqTransf starts exactly
                # at meanP, i.e. at the pretrained CLIP's zero-shot retrieval, instead of perturbing the
                # pretrained features with a random transformer before fine-tuning has seen any data.
                for layer in (block.proj, cast(nn.Linear, block.mlp[-1])):
                    nn.init.zeros_(layer.weight)
                    nn.init.zeros_(layer.bias)

    def encode_video(self, video: Tensor) -> Tensor:
        """video: (B, T, C, H, W) float, CLIP-normalised -> (B, D) L2-normalised, D = CLIP projection dim."""
        return self.pool_video_tokens(self.video_tokens(video))

    def video_tokens(self, video: Tensor) -> Tensor:
        """video: (B, T, C, H, W) float, CLIP-normalised -> (B, T, D) per-frame features after the temporal
        aggregation blocks (seqTransf; meanP: the CLIP frame embeddings), before the mean; not normalised."""
        b, t, _, h, w = video.shape
        if t > self.max_frames:
            raise ValueError(f"{t} frames given, the model was built for at most {self.max_frames}")
        if (h, w) != (self.frame_size, self.frame_size):
            raise ValueError(f"frames are {h}x{w}, the CLIP vision tower takes {self.frame_size}x{self.frame_size}")
        # (B, T, C, H, W) -> (B*T, C, H, W): CLIP sees every frame as an image
        frames = video.flatten(0, 1)
        self._checkpoint_real_layers_only(self.clip.vision_model.encoder.layers)
        # v5 returns a BaseModelOutputWithPooling whose pooler_output is the projected embedding (B*T, D)
        frame_emb = self.clip.get_image_features(pixel_values=frames).pooler_output
        # (B*T, D) -> (B, T, D)
        frame_emb = frame_emb.view(b, t, -1)
        if self.temporal_blocks is not None and self.frame_pos is not None:
            x = frame_emb + self.frame_pos[:, :t]
            # Only the blocks' residual updates are added back (CLIP4Clip adds the whole transformer output,
            # which doubles the features and adds the position embeddings): with the zero-initialised output
            # projections the update is exactly 0 at step 0.
            update = run_blocks(self.temporal_blocks, x, None, self.grad_checkpointing and self.training) - x
            frame_emb = frame_emb + update
        return frame_emb

    def pool_video_tokens(self, video_tokens: Tensor) -> Tensor:
        """(B, T, D) from :meth:`video_tokens` -> (B, D) L2-normalised; ``encode_video`` is exactly this."""
        # Normalising each frame before the mean (as CLIP4Clip does) makes every frame count the same,
        # whatever the norm of its CLIP feature.
        return F.normalize(F.normalize(video_tokens, dim=-1).mean(dim=1), dim=-1)


def _build_tokenizer(cfg: ModelConfig, texts: Iterable[str]) -> CLIPTextAsset:
    """CLIP's own tokenizer and config from ``cfg.pretrained`` (the captions are not needed)."""
    return CLIPTextAsset.from_pretrained(_require_pretrained(cfg), cfg.max_text_length)


def _load_tokenizer(cfg: ModelConfig, folder: Path) -> CLIPTextAsset:
    return CLIPTextAsset.load(folder, cfg.max_text_length)


def _build_model(cfg: ModelConfig, tokenizer: CLIPTextAsset) -> CLIPVideoText:
    """Random weights from the CLIP config held by ``tokenizer``; :func:`_load_weights` loads the real ones."""
    if not isinstance(tokenizer, CLIPTextAsset):
        raise TypeError(f"model 'clip' needs the tokenizer built for it, got {type(tokenizer).__name__}")
    return CLIPVideoText(cfg, tokenizer.clip_config)


def _load_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Copy the pretrained CLIP weights of ``cfg.pretrained`` into ``model.clip`` (strict)."""
    if not isinstance(model, CLIPVideoText):
        raise TypeError(f"expected a CLIPVideoText, got {type(model).__name__}")
    # Strict: a config that does not match the checkpoint must fail here, not train a half-random model.
    model.clip.load_state_dict(pretrained_clip_state(_require_pretrained(cfg)), strict=True)


def pretrained_clip_state(source: str) -> dict[str, Tensor]:
    """The state dict of the pretrained ``CLIPModel`` at ``source`` (hub id or local folder), without its
    ``logit_scale`` (the contrastive temperature belongs to the loss)."""
    from transformers import CLIPModel

    if Path(source).exists():
        _check_folder(Path(source), "CLIP model")
    pretrained = CLIPModel.from_pretrained(source)
    return {k: v for k, v in pretrained.state_dict().items() if k != "logit_scale"}


register_model(
    "clip",
    ModelSpec(
        _build_tokenizer,
        _load_tokenizer,
        _build_model,
        "pretrained CLIP (transformers) per frame + CLIP4Clip meanP / seqTransf temporal aggregation",
        load_weights=_load_weights,
        pixel_mean=CLIP_MEAN,
        pixel_std=CLIP_STD,
    ),
)
