"""The CLIP-ViP backbone (model "clip_vip") on a tiny random CLIP saved like a hub checkpoint, and tiny
CLIP-ViP checkpoints in the released layout (tests/tiny_clip_vip.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import mama.models.clip_vip as clip_vip_module
from mama.config import LossConfig, MetaConfig, ModelConfig, QAConfig
from mama.models import create_model, create_tokenizer, from_pretrained, get_spec, save_pretrained
from mama.models.clip import CLIP_MEAN, CLIP_STD, CLIPTextAsset
from mama.models.clip_vip import CLIPViP, proxy_guided_attention, proxy_guided_layer
from mama.models.clip_vip_convert import is_adapter_key, load_released_checkpoint
from mama.models.qa import VideoQAModel
from mama.precision import autocast
from mama.tasks.retrieval.module import RetrievalModule
from mama.weighting import MetaWeighting, meta_forward_context
from tiny_clip import save_tiny_clip
from tiny_clip_vip import released_state_dict, save_released_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a small red circle moves left", "the big blue square slides up across a white screen"]
B, T, SIZE = 2, 3, 32  # SIZE: the tiny CLIP's image_size (patch 16: L = 4 patches a frame)


def _cfg(folder: Path, **overrides: object) -> ModelConfig:
    fields: dict[str, object] = {"name": "clip_vip", "pretrained": str(folder), "frame_size": SIZE, "max_frames": 8,
                                 "max_text_length": 16, "add_cls_num": 2, "temporal_size": 4, "adapter_dim": 8}  # fmt: skip
    fields.update(overrides)
    return ModelConfig(**fields)


def _build(folder: Path, seed: int = 1, **overrides: object) -> tuple[CLIPViP, CLIPTextAsset]:
    """A clip_vip model with the pretrained weights of ``folder`` (a CLIP folder or a checkpoint file)."""
    cfg = _cfg(folder, **overrides)
    tokenizer = create_tokenizer(cfg, CAPTIONS)
    torch.manual_seed(seed)
    model = create_model(cfg, tokenizer)
    get_spec("clip_vip").load_weights(model, cfg)
    return model, tokenizer


def _video(b: int = B, t: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, t, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))  # (B, T, C, H, W)


def _randomise_new_parameters(model: CLIPViP, std: float = 0.2) -> None:
    """Move the parameters that start at zero (temporal embedding, adapters' up projections) off zero, so
    that every path through the model carries signal and gradient."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("temporal_embedding", "up_proj.weight", "up_proj.bias")):
                p.normal_(0, std)


# --- acceptance: reduction to CLIP, the released checkpoints ----------------------------------------


def test_registered_with_clip_pixel_statistics() -> None:
    spec = get_spec("clip_vip")
    assert spec.pixel_mean == CLIP_MEAN and spec.pixel_std == CLIP_STD and spec.load_weights is not None


def test_one_frame_without_proxies_temporal_embedding_or_adapters_is_clip(tiny_clip_dir: Path) -> None:
    """The reduction test of issue 17: the same image embedding as transformers' CLIPModel (1e-5)."""
    from transformers import CLIPModel

    model, tokenizer = _build(tiny_clip_dir, add_cls_num=0, temporal_embed=False, adapters=False)
    reference = CLIPModel.from_pretrained(str(tiny_clip_dir)).eval()
    model.eval()
    frame = _video(b=3, t=1)
    input_ids, attention_mask = tokenizer(CAPTIONS)
    with torch.no_grad():
        expected = reference.get_image_features(pixel_values=frame[:, 0]).pooler_output
        projected = model.clip.visual_projection(model.video_tokens(frame)[:, 0])  # before normalisation
        torch.testing.assert_close(projected, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.encode_video(frame), F.normalize(expected, dim=-1), rtol=0, atol=1e-5)
        text = reference.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        torch.testing.assert_close(model.encode_text(input_ids, attention_mask), F.normalize(text, dim=-1))
        # Not a property of any image model: proxies change the [CLS] state.
        with_proxies, _ = _build(tiny_clip_dir, add_cls_num=2, temporal_embed=False, adapters=False)
        assert not torch.allclose(with_proxies.eval().encode_video(frame), F.normalize(expected, dim=-1), atol=1e-3)


@pytest.mark.parametrize("adapters", [False, True], ids=["clip-vip-layout", "mama-layout"])
def test_released_checkpoint_loads_every_key_and_round_trips(
    tiny_clip_dir: Path, tmp_path: Path, adapters: bool
) -> None:
    """The released-layout acceptance test of issue 17: no missing or unexpected key, every tensor where it
    belongs, and save_pretrained / from_pretrained give identical embeddings."""
    state = released_state_dict(tiny_clip_dir, add_cls_num=2, temporal_size=4, adapters=adapters, adapter_dim=8)
    path = tmp_path / "pretrain_clipvip_tiny.pt"
    torch.save(state, path)
    cfg = _cfg(path, clip_config=str(tiny_clip_dir), adapters=adapters)
    tokenizer = create_tokenizer(cfg, CAPTIONS)
    model = create_model(cfg, tokenizer)
    report = load_released_checkpoint(model.clip, path)
    assert report.initialised == []  # nothing missing
    assert set(report.loaded) == set(model.clip.state_dict())  # nothing unexpected either (else it raises)
    dropped = {"clipmodel.logit_scale", "clipmodel.text_model.embeddings.position_ids",
               "clipmodel.vision_model.embeddings.position_ids"}  # fmt: skip
    if adapters:  # the authors' image-tower attention adapters, never called by their proxy-guided attention
        dropped |= {k for k in state if ".vision_model." in k and ".self_attn.adaptmlp." in k}
    assert set(report.dropped) == dropped
    ours = model.state_dict()
    for key, tensor in state.items():
        if key not in dropped:
            assert torch.equal(ours["clip." + key.removeprefix("clipmodel.")], tensor), key

    # The same through the registry's load_weights (what `model.pretrained: <file>` runs), then a round trip.
    torch.manual_seed(5)
    loaded = create_model(cfg, tokenizer)
    get_spec("clip_vip").load_weights(loaded, cfg)
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, ours[key]), key
    folder = save_pretrained(tmp_path / "saved", cfg, loaded, tokenizer)
    _, reloaded, reloaded_tokenizer = from_pretrained(folder)
    loaded.eval()
    video, texts = _video(t=5), [*CAPTIONS, "an unseen caption"]
    with torch.no_grad():
        assert torch.equal(reloaded.encode_video(video), loaded.encode_video(video))
        ids, mask = reloaded_tokenizer(texts)
        assert torch.equal(reloaded.encode_text(ids, mask), loaded.encode_text(*tokenizer(texts)))


def test_clip_vip_checkpoint_without_adapters_starts_fresh_adapters(tiny_clip_dir: Path, tmp_path: Path) -> None:
    """MAMA's fine-tuning starts from a released CLIP-ViP (no adapters): the adapters keep their initial
    identity, so the model computes what the checkpoint computes without adapters."""
    path = save_released_checkpoint(tmp_path / "vip.pt", tiny_clip_dir, add_cls_num=2, temporal_size=4)
    with_adapters, tokenizer = _build(path, clip_config=str(tiny_clip_dir), adapters=True)
    plain, _ = _build(path, clip_config=str(tiny_clip_dir), adapters=False)
    report = load_released_checkpoint(with_adapters.clip, path)
    assert report.initialised and all(is_adapter_key(k) for k in report.initialised)
    assert len(report.initialised) == 6 * (2 * 3 + 2 * 2)  # 6 tensors an adapter; 3 per text layer, 2 per image layer
    video, (ids, mask) = _video(), tokenizer(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(with_adapters.eval().encode_video(video), plain.eval().encode_video(video))
        torch.testing.assert_close(with_adapters.encode_text(ids, mask), plain.encode_text(ids, mask))


def test_checkpoint_files_of_every_kind_load(tiny_clip_dir: Path, tmp_path: Path) -> None:
    """A training checkpoint (state nested under model_state_dict, DDP's module. prefix) and safetensors."""
    from safetensors.torch import save_file

    state = released_state_dict(tiny_clip_dir, add_cls_num=2, temporal_size=4)
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in state.items()}, "step": 3}, tmp_path / "restore.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "vip.safetensors"))
    cfg = _cfg(tiny_clip_dir)
    for name in ("restore.pt", "vip.safetensors"):
        model = create_model(cfg, create_tokenizer(cfg, CAPTIONS))
        report = load_released_checkpoint(model.clip, tmp_path / name)
        assert not report.initialised
        assert torch.equal(
            model.clip.vision_model.embeddings.added_cls, state["clipmodel.vision_model.embeddings.added_cls"]
        )


def _expect_load_error(model: CLIPViP, tmp_path: Path, state: dict[str, torch.Tensor], *patterns: str) -> str:
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        load_released_checkpoint(model.clip, path, hint="the settings")
    message = str(err.value)
    assert str(path) in message and "the settings" in message
    for pattern in patterns:
        assert pattern in message, message
    return message


def test_malformed_checkpoints_fail_listing_every_bad_key(tiny_clip_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_clip_dir)
    model = create_model(cfg, create_tokenizer(cfg, CAPTIONS))
    good = released_state_dict(tiny_clip_dir, add_cls_num=2, temporal_size=4)

    missing = {
        k: v for k, v in good.items() if not k.endswith(("added_cls", "text_model.encoder.layers.1.mlp.fc2.bias"))
    }
    _expect_load_error(model, tmp_path, missing, "missing keys (2): ", "vision_model.embeddings.added_cls",
                       "text_model.encoder.layers.1.mlp.fc2.bias")  # fmt: skip
    extra = {**good, "clipmodel.vision_model.extra_head.weight": torch.zeros(2), "not_clip.x": torch.zeros(1)}
    _expect_load_error(model, tmp_path, extra, "unexpected keys (2): ", "vision_model.extra_head.weight", "not_clip.x")
    # A checkpoint for other settings: 12 temporal slots and 3 proxies instead of 4 and 2.
    other = released_state_dict(tiny_clip_dir, add_cls_num=3, temporal_size=12)
    _expect_load_error(model, tmp_path, other, "shape mismatches (2): ",
                       "vision_model.embeddings.temporal_embedding: checkpoint (1, 12, 32), model (1, 4, 32)",
                       "vision_model.embeddings.added_cls: checkpoint (3, 32), model (2, 32)")  # fmt: skip
    # Adapters in the checkpoint but not in the model, and a model with adapters given only some of them.
    mama = released_state_dict(tiny_clip_dir, add_cls_num=2, temporal_size=4, adapters=True)
    _expect_load_error(model, tmp_path, mama, "unexpected keys (60): ", "mlp.adaptmlp_1.down_proj.weight")
    with_adapters = create_model(_cfg(tiny_clip_dir, adapters=True), create_tokenizer(cfg, CAPTIONS))
    partial = {k: v for k, v in mama.items() if "mlp.adaptmlp_2." not in k}
    _expect_load_error(with_adapters, tmp_path, partial, "missing keys (24): ", "mlp.adaptmlp_2.up_proj.weight")
    # Files that are not state dicts at all.
    for bad, what in (([1, 2], "expected a state dict"), ({"a": 1}, "not tensors")):
        torch.save(bad, tmp_path / "junk.pt")
        with pytest.raises(ValueError, match=what):
            load_released_checkpoint(model.clip, tmp_path / "junk.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read a state dict"):
        load_released_checkpoint(model.clip, tmp_path / "text.pt")
    # A checkpoint file holds no tokenizer: model.clip_config must name the CLIP it came from.
    torch.save(good, tmp_path / "good.pt")
    with pytest.raises(ValueError, match="model.clip_config"):
        create_tokenizer(_cfg(tmp_path / "good.pt"), CAPTIONS)
    with pytest.raises(ValueError, match="model.pretrained"):
        create_tokenizer(_cfg(tiny_clip_dir, pretrained=""), CAPTIONS)


def test_init_from_a_plain_clip_folder_initialises_the_new_parameters_as_the_authors(
    tiny_clip_dir: Path, tmp_path: Path
) -> None:
    from transformers import CLIPModel

    cfg = _cfg(tiny_clip_dir, add_cls_num=3, adapters=True)
    tokenizer = create_tokenizer(cfg, CAPTIONS)
    torch.manual_seed(1)
    model = create_model(cfg, tokenizer)
    proxies_at_construction = model.clip.vision_model.embeddings.added_cls.detach().clone()
    get_spec("clip_vip").load_weights(model, cfg)
    reference = CLIPModel.from_pretrained(str(tiny_clip_dir)).state_dict()
    ours = model.clip.state_dict()
    for key, tensor in reference.items():
        if key != "logit_scale":
            assert torch.equal(ours[key], tensor), key
    embeddings = model.clip.vision_model.embeddings
    # Proxies: a standard normal draw (torch.randn in the authors' embeddings), untouched by loading.
    assert torch.equal(embeddings.added_cls, proxies_at_construction) and embeddings.added_cls.shape == (3, 32)
    assert 0.5 < embeddings.added_cls.std().item() < 1.5
    assert torch.equal(embeddings.temporal_embedding, torch.zeros(1, 4, 32))
    adapters = [m for name, m in model.named_modules() if name.endswith(("adaptmlp", "adaptmlp_1", "adaptmlp_2"))]
    assert len(adapters) == 2 * 3 + 2 * 2
    for adapter in adapters:
        norm, down, up = adapter.adapter_layer_norm_before, adapter.down_proj, adapter.up_proj
        assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()
        assert not up.weight.any() and not up.bias.any() and not down.bias.any()
        bound = 1 / math.sqrt(down.in_features)  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert down.weight.abs().max() <= bound and down.weight.std() > bound / 4
    # A CLIP of another size does not fit: every mismatched key is named.
    other = save_tiny_clip(tmp_path / "wide_clip", hidden_size=48)
    with pytest.raises(ValueError, match=r"(?s)this CLIP does not fit the clip_vip model.*shape mismatches \(77\)"):
        get_spec("clip_vip").load_weights(model, _cfg(other, add_cls_num=3, adapters=True))


# --- the architecture -------------------------------------------------------------------------------


def test_proxy_guided_attention_is_attention_under_the_block_mask() -> None:
    g = torch.Generator().manual_seed(0)
    m, t, per_frame = 3, 4, 5
    q, k, v = (torch.randn(2, 2, m + t * per_frame, 8, generator=g) for _ in range(3))  # (B, H, M + T*L, d)
    # Written out: proxies see everything; a patch sees the proxies and its own frame's patches.
    frame = torch.cat([torch.full((m,), -1), torch.arange(t).repeat_interleave(per_frame)])
    allowed = (frame[:, None] == -1) | (frame[None, :] == -1) | (frame[:, None] == frame[None, :])
    allowed[m:, :m] = True
    allowed[:m] = True
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(proxy_guided_attention(q, k, v, m, t), expected)
    with pytest.raises(ValueError, match="not 3 proxies plus 4 frames"):
        proxy_guided_attention(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], m, t)


def test_a_patch_token_sees_the_proxies_and_its_own_frame_only(tiny_clip_dir: Path) -> None:
    model, _ = _build(tiny_clip_dir, add_cls_num=2)
    _randomise_new_parameters(model)
    model.eval()
    m, per_frame = model.num_proxies, 4
    layer = model.clip.vision_model.encoder.layers[0]
    with torch.no_grad():
        x = model.clip.vision_model.pre_layrnorm(model.embed_video(_video(t=T)))  # (B, M + T*L, W)
        assert x.shape == (B, m + T * per_frame, 32)
        out = proxy_guided_layer(layer, x, m, T)
        changed = x.clone()
        last = slice(m + (T - 1) * per_frame, None)  # the patches of the last frame
        changed[:, last] += torch.randn_like(changed[:, last])
        out_changed = proxy_guided_layer(layer, changed, m, T)
        others = slice(m, m + (T - 1) * per_frame)  # the patches of every other frame
        torch.testing.assert_close(out_changed[:, others], out[:, others], rtol=0, atol=1e-6)
        assert (out_changed[:, :m] - out[:, :m]).abs().amax(dim=-1).min() > 1e-3  # every proxy saw it
        # A proxy's change reaches the patches of every frame.
        changed = x.clone()
        changed[:, 1] += torch.randn_like(changed[:, 1])  # (a constant shift would vanish in the layer norm)
        out_changed = proxy_guided_layer(layer, changed, m, T)
        assert (out_changed[:, m:] - out[:, m:]).abs().amax(dim=-1).min() > 1e-4


def test_temporal_embedding_is_interpolated_linearly_when_the_frame_count_differs(tiny_clip_dir: Path) -> None:
    model, _ = _build(tiny_clip_dir, temporal_size=4)
    table = model.clip.vision_model.embeddings.temporal_embedding
    with torch.no_grad():
        table.normal_()
    assert model.temporal_embedding(4) is table
    source = table[0].detach().numpy()  # (S, W)
    for frames in (1, 2, 3, 7):
        # align_corners=False: frame i sits at (i + 0.5) * S / T - 0.5 on the table's axis, clamped to its ends.
        where = np.clip((np.arange(frames) + 0.5) * 4 / frames - 0.5, 0, 3)
        expected = np.stack([np.interp(where, np.arange(4), source[:, c]) for c in range(source.shape[1])], axis=1)
        got = model.temporal_embedding(frames)
        assert got.shape == (1, frames, 32)
        np.testing.assert_allclose(got[0].detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    # Frame order matters through it, whatever the frame count.
    model.eval()
    with torch.no_grad():
        for frames in (2, 4, 7):
            video = _video(t=frames)
            assert (model.encode_video(video) - model.encode_video(video.flip(1))).abs().max() > 1e-4
    no_table, _ = _build(tiny_clip_dir, temporal_embed=False)
    assert no_table.temporal_embedding(3) is None
    assert not hasattr(no_table.clip.vision_model.embeddings, "temporal_embedding")


def test_adapters_start_as_the_identity_and_sit_where_the_authors_put_them(tiny_clip_dir: Path) -> None:
    plain, tokenizer = _build(tiny_clip_dir, adapters=False)
    adapted, _ = _build(tiny_clip_dir, adapters=True)
    missing, unexpected = adapted.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(is_adapter_key(k) for k in missing)
    plain.eval(), adapted.eval()
    video, (ids, mask) = _video(), tokenizer(CAPTIONS)

    def outputs(model: CLIPViP) -> list[torch.Tensor]:
        with torch.no_grad():
            return [model.encode_video(video), model.encode_text(ids, mask), model.text_tokens(ids, mask)]

    for a, b in zip(outputs(adapted), outputs(plain), strict=True):
        torch.testing.assert_close(a, b)
    names = {n.rsplit(".", 2)[0] for n, _ in adapted.named_parameters() if is_adapter_key(n)}
    assert names == {
        f"clip.{tower}_model.encoder.layers.{i}.{site}"
        for tower, sites in (("text", ("self_attn.adaptmlp", "mlp.adaptmlp_1", "mlp.adaptmlp_2")),
                             ("vision", ("mlp.adaptmlp_1", "mlp.adaptmlp_2")))
        for i in range(2) for site in sites
    }  # fmt: skip
    # Each adapter is on the path of its tower: moving it moves that tower's output only.
    base = outputs(adapted)
    for site, tower in (("text_model.encoder.layers.0.self_attn.adaptmlp", 1),
                        ("text_model.encoder.layers.1.mlp.adaptmlp_1", 1),
                        ("vision_model.encoder.layers.0.mlp.adaptmlp_1", 0),
                        ("vision_model.encoder.layers.1.mlp.adaptmlp_2", 0)):  # fmt: skip
        up = adapted.clip.get_submodule(site).up_proj
        with torch.no_grad():
            up.bias.normal_(0, 0.5)  # (a constant shift of the residual stream would vanish in the layer norms)
        moved = outputs(adapted)
        with torch.no_grad():
            up.bias.zero_()
        assert (moved[tower] - base[tower]).abs().max() > 1e-3, site
        torch.testing.assert_close(moved[1 - tower], base[1 - tower])


def test_backbone_prefixes_are_the_pretrained_parameters_not_the_adapters(tiny_clip_dir: Path) -> None:
    model, _ = _build(tiny_clip_dir, adapters=True)
    names = [n for n, _ in model.named_parameters()]
    backbone = {n for n in names if n.startswith(model.backbone_prefixes)}
    assert backbone == {n for n in names if not is_adapter_key(n)}
    assert "clip.vision_model.embeddings.added_cls" in backbone and "clip.logit_scale" not in names
    assert all(n.startswith("clip.") for n in names)


def test_frame_size_and_frame_count_errors(tiny_clip_dir: Path) -> None:
    cfg = _cfg(tiny_clip_dir, frame_size=24)
    with pytest.raises(ValueError, match="frame_size=24.*32x32"):
        create_model(cfg, create_tokenizer(cfg, CAPTIONS))
    model, _ = _build(tiny_clip_dir)
    with pytest.raises(ValueError, match="at most 8"):
        model.encode_video(_video(t=9))
    with pytest.raises(ValueError, match="16x16"):
        model.encode_video(torch.zeros(1, 2, 3, 16, 16))


# --- training: gradient checkpointing, bf16, the meta step, QA ----------------------------------------


def _contrastive(model: CLIPViP, tokenizer: CLIPTextAsset, video: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE written out here: models only return embeddings."""
    logits = 10.0 * model.encode_video(video) @ model.encode_text(*tokenizer(CAPTIONS)).T
    target = torch.arange(len(logits))
    return F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)


def _gradients(model: CLIPViP, tokenizer: CLIPTextAsset, second_order: bool) -> list[torch.Tensor]:
    params = [p for _, p in model.named_parameters()]
    with sdpa_kernel([SDPBackend.MATH]):
        loss = _contrastive(model, tokenizer, _video())
        grads = torch.autograd.grad(loss, params, create_graph=second_order)
        if not second_order:
            return list(grads)
        penalty = sum((g**2).sum() for g in grads)
        return list(torch.autograd.grad(penalty, params, allow_unused=True, materialize_grads=True))


def test_gradient_checkpointing_gives_the_same_first_and_second_order_gradients(
    tiny_clip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain, tokenizer = _build(tiny_clip_dir, adapters=True)
    _randomise_new_parameters(plain)
    recomputed, _ = _build(tiny_clip_dir, adapters=True, grad_checkpointing=True)
    recomputed.load_state_dict(plain.state_dict())
    assert all(layer.gradient_checkpointing for layer in recomputed.clip.text_model.encoder.layers)
    calls = {"n": 0}
    original = clip_vip_module.proxy_guided_layer

    def counted(*args: object) -> torch.Tensor:
        calls["n"] += 1
        return original(*args)

    monkeypatch.setattr(clip_vip_module, "proxy_guided_layer", counted)
    for second_order in (False, True):
        expected = _gradients(plain, tokenizer, second_order)
        calls["n"] = 0
        actual = _gradients(recomputed, tokenizer, second_order)
        assert calls["n"] > 2, "the image tower's layers were not recomputed in backward"
        assert all(torch.isfinite(g).all() for g in expected) and sum(g.abs().sum() for g in expected) > 0
        for (name, _), a, e in zip(plain.named_parameters(), actual, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_bf16_autocast_runs_forward_and_backward(tiny_clip_dir: Path) -> None:
    model, tokenizer = _build(tiny_clip_dir, adapters=True)
    _randomise_new_parameters(model)
    video = _video()
    with torch.no_grad():
        fp32 = (model.encode_video(video), model.encode_text(*tokenizer(CAPTIONS)))
    with autocast("cpu", "bf16"):
        bf16 = (model.encode_video(video), model.encode_text(*tokenizer(CAPTIONS)))
        loss = _contrastive(model, tokenizer, video)
    assert bf16[0].dtype == torch.bfloat16
    for low, full in zip(bf16, fp32, strict=True):
        torch.testing.assert_close(low.float(), full, rtol=0, atol=0.05)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_second_order_meta_step_runs_through_clip_vip(tiny_clip_dir: Path) -> None:
    """The exact meta step (virtual step over every parameter, double backward through the proxy-guided
    attention and the adapters) gives a nonzero meta-gradient, the same with and without checkpointing."""
    updates = []
    for checkpointing in (False, True):
        model, tokenizer = _build(tiny_clip_dir, adapters=True, grad_checkpointing=checkpointing)
        _randomise_new_parameters(model)
        task = RetrievalModule(model, LossConfig(margin=0.05, init_logit_scale=math.log(10))).train()

        def batch(texts: list[str], seed: int, tokenizer: CLIPTextAsset = tokenizer) -> dict[str, torch.Tensor]:
            ids, mask = tokenizer(texts)
            return {"video": _video(b=len(texts), seed=seed), "input_ids": ids, "attention_mask": mask}

        texts = [*CAPTIONS, "a green cross drifts down", "a yellow diamond on black"]
        torch.manual_seed(2)
        meta = MetaWeighting(
            MetaConfig(interval=1, zero_init=False, optimizer="sgd", lr=1.0, virtual_lr=1.0, virtual_params=[]), task
        )
        before = [p.detach().clone() for p in meta.wnet.parameters()]
        with meta_forward_context(True):
            losses = task(batch(texts, seed=3))["loss_per_sample"]
            result = meta.step(task, losses, batch(texts[::-1], seed=4), step=0)
        assert result.meta_loss is not None and math.isfinite(result.meta_loss)
        # SGD at lr 1 from a zero momentum buffer: the change of the net is its meta-gradient.
        updates.append([p.detach() - b for p, b in zip(meta.wnet.parameters(), before, strict=True)])
        assert max(u.abs().max().item() for u in updates[-1]) > 1e-6, "zero meta-gradient"
    for a, b in zip(*updates, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("answer_format", ["open", "mc"])
def test_qa_fusion_uses_clip_vip_as_its_encoder(tiny_clip_dir: Path, answer_format: str) -> None:
    encoder, tokenizer = _build(tiny_clip_dir, add_cls_num=2, adapters=True)
    _randomise_new_parameters(encoder)
    qa_cfg = QAConfig(num_answers=5, fusion_layers=1, fusion_width=32, fusion_heads=2, dropout=0.0,
                      answer_format=answer_format)  # fmt: skip
    qa = VideoQAModel(encoder, qa_cfg)
    video = _video()
    tokens = encoder.video_tokens(video)
    assert tokens.shape == (B, encoder.num_proxies + T, encoder.video_token_dim)  # [CLS], proxies, frames
    torch.testing.assert_close(encoder.pool_video_tokens(tokens), encoder.encode_video(video))
    if answer_format == "open":
        out = qa.open_logits(video, *tokenizer(["what colour is it", "what moves"]))
        assert out.shape == (B, 5)
    else:
        ids, mask = tokenizer(["is it red", "is it blue", "is it a square", "is it a circle"])
        out = qa.mc_scores(video, ids.view(B, 2, -1), mask.view(B, 2, -1))
        assert out.shape == (B, 2)
    out.sum().backward()
    assert all(prefix.startswith("encoder.clip.") for prefix in qa.backbone_prefixes)
    # Every encoder parameter but the projections (used by the QA task's auxiliary contrastive loss only).
    unused = ("encoder.clip.visual_projection.", "encoder.clip.text_projection.")
    for name, p in qa.named_parameters():
        if not name.startswith(unused):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
