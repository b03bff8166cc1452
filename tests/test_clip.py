"""The pretrained CLIP backbone (model "clip") on a tiny random CLIP saved like a hub checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mama.config import ModelConfig
from mama.models import create_model, create_tokenizer, get_spec, load_tokenizer
from mama.models.clip import CLIP_MEAN, CLIP_STD, CLIPTextAsset, CLIPVideoText

CAPTIONS = ["a small red circle moves left", "the big blue square slides up across a white screen"]
B, T, SIZE = 2, 3, 32  # SIZE: the tiny CLIP's image_size


def _cfg(folder: Path, **overrides: object) -> ModelConfig:
    fields: dict[str, object] = {"name": "clip", "pretrained": str(folder), "frame_size": SIZE, "max_frames": 4,
                                 "max_text_length": 16, "temporal": "meanP", "temporal_layers": 2}  # fmt: skip
    fields.update(overrides)
    return ModelConfig(**fields)


def _build(folder: Path, **overrides: object) -> tuple[CLIPVideoText, CLIPTextAsset]:
    """Model with the tiny CLIP's pretrained weights loaded (after a random construction)."""
    cfg = _cfg(folder, **overrides)
    tokenizer = create_tokenizer(cfg, CAPTIONS)
    torch.manual_seed(1)
    model = create_model(cfg, tokenizer)
    get_spec("clip").load_weights(model, cfg)
    return model, tokenizer


def _video(b: int = B, t: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, t, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))  # (B, T, C, H, W)


def test_spec_uses_clip_pixel_statistics() -> None:
    spec = get_spec("clip")
    assert spec.pixel_mean == CLIP_MEAN and spec.pixel_std == CLIP_STD and spec.load_weights is not None


@pytest.mark.parametrize("temporal", ["meanP", "seqTransf"])
def test_forward_shapes_and_normalised(tiny_clip_dir: Path, temporal: str) -> None:
    model, tokenizer = _build(tiny_clip_dir, temporal=temporal)
    video_emb = model.encode_video(_video())
    text_emb = model.encode_text(*tokenizer(CAPTIONS))
    assert video_emb.shape == text_emb.shape == (B, 16)  # the tiny CLIP's projection_dim
    torch.testing.assert_close(video_emb.norm(dim=-1), torch.ones(B))
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(B))


def test_backbone_prefixes_cover_exactly_the_clip_weights(tiny_clip_dir: Path) -> None:
    model, _ = _build(tiny_clip_dir, temporal="seqTransf")
    names = [name for name, _ in model.named_parameters()]
    backbone = [n for n in names if n.startswith(model.backbone_prefixes)]
    assert set(backbone) == {f"clip.{n}" for n, _ in model.clip.named_parameters()}
    assert {n for n in names if n not in backbone} and all(
        n.startswith(("frame_pos", "temporal_blocks.")) for n in names if n not in backbone
    )
    # The loss owns the temperature: an unused CLIP logit_scale would have no gradient (DDP hangs on that).
    assert "clip.logit_scale" not in names


def test_load_weights_loads_the_saved_clip(tiny_clip_dir: Path) -> None:
    from transformers import CLIPModel

    model, tokenizer = _build(tiny_clip_dir)
    reference = CLIPModel.from_pretrained(str(tiny_clip_dir)).eval()
    model.eval()
    frame = _video(t=1)  # one frame: meanP of a single normalised frame is that frame's CLIP embedding
    input_ids, attention_mask = tokenizer(CAPTIONS)
    with torch.no_grad():
        expected_video = F.normalize(reference.get_image_features(pixel_values=frame[:, 0]).pooler_output, dim=-1)
        expected_text = F.normalize(
            reference.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output, dim=-1
        )
        torch.testing.assert_close(model.encode_video(frame), expected_video)
        torch.testing.assert_close(model.encode_text(input_ids, attention_mask), expected_text)
        # Not a coincidence of initialisation: the randomly constructed model differs.
        cfg = _cfg(tiny_clip_dir)
        torch.manual_seed(1)
        unloaded = create_model(cfg, create_tokenizer(cfg, CAPTIONS)).eval()
        assert not torch.allclose(unloaded.encode_video(frame), expected_video)


def test_seq_transf_starts_at_mean_pooling(tiny_clip_dir: Path) -> None:
    mean_model, _ = _build(tiny_clip_dir, temporal="meanP")
    seq_model, _ = _build(tiny_clip_dir, temporal="seqTransf")
    video = _video()
    with torch.no_grad():
        torch.testing.assert_close(seq_model.encode_video(video), mean_model.encode_video(video))


def _contrastive(model: CLIPVideoText, tokenizer: CLIPTextAsset, video: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE written out here: models only return embeddings."""
    logits = 10.0 * model.encode_video(video) @ model.encode_text(*tokenizer(CAPTIONS)).T
    target = torch.arange(len(logits))
    return F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)


def test_gradients_reach_backbone_and_temporal_layers(tiny_clip_dir: Path) -> None:
    model, tokenizer = _build(tiny_clip_dir, temporal="seqTransf")
    _contrastive(model, tokenizer, _video()).backward()
    for name, p in model.clip.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"clip.{name} gets no gradient"
    # At step 0 only the zero-initialised output projections of the temporal blocks get a gradient (the
    # blocks are the identity); once those have moved, every temporal parameter does.
    out_projections = [b.proj.weight for b in model.temporal_blocks] + [b.mlp[-1].weight for b in model.temporal_blocks]
    assert all(p.grad.abs().sum() > 0 for p in out_projections)
    with torch.no_grad():
        for p in out_projections:
            p -= 0.1 * p.grad
    model.zero_grad()
    _contrastive(model, tokenizer, _video()).backward()
    for name, p in model.named_parameters():
        if not name.startswith("clip."):
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient after one step"


def _second_order_grads(model: CLIPVideoText, tokenizer: CLIPTextAsset) -> list[torch.Tensor]:
    """Gradient of the squared gradient norm: a second backward through a graph built with
    create_graph=True, as the meta step does (under the MATH attention kernel, as the meta step runs)."""
    params = [p for _, p in model.named_parameters()]
    with sdpa_kernel([SDPBackend.MATH]):
        loss = _contrastive(model, tokenizer, _video())
        grads = torch.autograd.grad(loss, params, create_graph=True)
        penalty = sum((g**2).sum() for g in grads)
        return list(torch.autograd.grad(penalty, params, allow_unused=True, materialize_grads=True))


def test_double_backward_with_and_without_grad_checkpointing(tiny_clip_dir: Path) -> None:
    plain, tokenizer = _build(tiny_clip_dir, temporal="seqTransf")
    recomputed, _ = _build(tiny_clip_dir, temporal="seqTransf", grad_checkpointing=True)
    layers = list(recomputed.clip.text_model.encoder.layers) + list(recomputed.clip.vision_model.encoder.layers)
    assert all(layer.gradient_checkpointing for layer in layers)
    assert not any(layer.gradient_checkpointing for layer in plain.clip.vision_model.encoder.layers)
    with torch.no_grad():  # non-trivial temporal blocks, so their second-order path is exercised too
        for block in plain.temporal_blocks:
            block.proj.weight.normal_(0, 0.05)
            block.mlp[-1].weight.normal_(0, 0.05)
    recomputed.load_state_dict(plain.state_dict())
    expected = _second_order_grads(plain, tokenizer)
    actual = _second_order_grads(recomputed, tokenizer)
    assert all(torch.isfinite(g).all() for g in expected)
    backbone_grads = [
        g for (name, _), g in zip(plain.named_parameters(), expected, strict=True) if name.startswith("clip.")
    ]
    assert sum(g.abs().sum() for g in backbone_grads) > 0
    # Recomputing activations must not change the second-order gradient.
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


def test_frame_size_and_frame_count_errors(tiny_clip_dir: Path) -> None:
    cfg = _cfg(tiny_clip_dir, frame_size=24)
    with pytest.raises(ValueError, match="frame_size=24.*32x32"):
        create_model(cfg, create_tokenizer(cfg, CAPTIONS))
    model, _ = _build(tiny_clip_dir)
    with pytest.raises(ValueError, match="at most 4"):
        model.encode_video(_video(t=5))
    with pytest.raises(ValueError, match="16x16"):
        model.encode_video(torch.zeros(1, 2, 3, 16, 16))


def test_needs_pretrained_and_a_known_temporal_mode(tiny_clip_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model.pretrained"):
        create_tokenizer(_cfg(tiny_clip_dir, pretrained=""), CAPTIONS)
    cfg = _cfg(tiny_clip_dir, temporal="seqLSTM")
    with pytest.raises(ValueError, match="meanP"):
        create_model(cfg, create_tokenizer(cfg, CAPTIONS))
    with pytest.raises(FileNotFoundError, match="missing_asset"):
        load_tokenizer(cfg, tmp_path / "missing_asset")


def test_tokenizer_pads_and_truncates_keeping_eos(tiny_clip_dir: Path) -> None:
    tokenizer = create_tokenizer(_cfg(tiny_clip_dir, max_text_length=8), CAPTIONS)
    hf = tokenizer.hf_tokenizer
    input_ids, attention_mask = tokenizer(["a red circle", " ".join(["square"] * 20)])
    assert input_ids.shape == attention_mask.shape == (2, 8)
    assert input_ids.dtype == attention_mask.dtype == torch.long
    assert (input_ids[:, 0] == hf.bos_token_id).all()
    length = int(attention_mask[0].sum())
    assert 3 < length < 8 and attention_mask[0].tolist() == [1] * length + [0] * (8 - length)
    assert input_ids[0, length - 1].item() == hf.eos_token_id and (input_ids[0, length:] == hf.pad_token_id).all()
    assert hf.decode(input_ids[0, :length].tolist(), skip_special_tokens=True) == "a red circle"
    # The long caption is cut inside the words; the EOS stays last, where CLIP pools.
    assert attention_mask[1].all() and input_ids[1, -1].item() == tokenizer.eos_id == hf.eos_token_id
    assert tokenizer.eos_id == tokenizer.clip_config.text_config.eos_token_id


def test_tokenizer_rejects_a_config_pooling_at_another_token(tiny_clip_dir: Path) -> None:
    tokenizer = create_tokenizer(_cfg(tiny_clip_dir), CAPTIONS)
    config = tokenizer.clip_config.__class__.from_dict(tokenizer.clip_config.to_dict())
    config.text_config.eos_token_id = tokenizer.eos_id - 1
    with pytest.raises(ValueError, match="eos_token_id"):
        CLIPTextAsset(tokenizer.hf_tokenizer, config, max_length=16)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        CLIPTextAsset(tokenizer.hf_tokenizer, tokenizer.clip_config, max_length=1000)


def test_tokenizer_asset_round_trip_rebuilds_model_offline(tiny_clip_dir: Path, tmp_path: Path) -> None:
    source = shutil.copytree(tiny_clip_dir, tmp_path / "hub_copy")
    cfg = _cfg(source, temporal="seqTransf")
    tokenizer = create_tokenizer(cfg, CAPTIONS)
    tokenizer.save(tmp_path / "asset")
    shutil.rmtree(source)  # the saved asset alone must be enough (no hub, no pretrained folder)
    loaded = load_tokenizer(cfg, tmp_path / "asset")
    texts = CAPTIONS + ["an unseen caption about a yellow diamond drifting down", ""]
    for a, b in zip(tokenizer(texts), loaded(texts), strict=True):
        assert torch.equal(a, b)

    def comparable(config: object) -> dict:
        return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}  # where it was read from

    assert comparable(loaded.clip_config) == comparable(tokenizer.clip_config)
    torch.manual_seed(3)
    original = create_model(cfg, tokenizer)
    torch.manual_seed(3)
    rebuilt = create_model(cfg, loaded)
    assert original.state_dict().keys() == rebuilt.state_dict().keys()
    for name, tensor in original.state_dict().items():
        assert rebuilt.state_dict()[name].shape == tensor.shape, name
