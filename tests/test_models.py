import functools
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mama.config import ModelConfig
from mama.models import create_model, create_tokenizer, get_spec, list_models, load_tokenizer
from mama.tokenizer import WordTokenizer

CAPTIONS = [
    "a small red circle moves left on a black background",
    "a large blue square slides up across a white screen",
    "the green cross is big and drifts down against a gray background",
]
B, T, SIZE = 3, 4, 16


def _tiny(name: str) -> ModelConfig:
    cfg = ModelConfig(
        name=name, embed_dim=16, width=32, heads=2, video_layers=1, text_layers=1,
        stem_channels=4, frame_size=SIZE, max_frames=8, max_text_length=16,
    )  # fmt: skip
    if name == "clip":
        # A 16 px tiny CLIP saved like a hub checkpoint; seqTransf, so frame order matters.
        cfg.pretrained = str(_tiny_clip_folder())
        cfg.temporal = "seqTransf"
        cfg.temporal_layers = 1
    if name == "clip_vip":
        # The same tiny CLIP with proxies, a temporal embedding (frame order matters) and the adapters.
        cfg.pretrained = str(_tiny_clip_folder())
        cfg.add_cls_num, cfg.temporal_size, cfg.adapters, cfg.adapter_dim = 2, T, True, 8
    return cfg


@functools.cache
def _tiny_clip_folder() -> Path:
    from tiny_clip import save_tiny_clip

    return save_tiny_clip(Path(tempfile.mkdtemp(prefix="mama_test_models_clip_")), image_size=SIZE, patch_size=8)


def _build(name: str, grad_checkpointing: bool = False) -> tuple[torch.nn.Module, object]:
    cfg = _tiny(name)
    cfg.grad_checkpointing = grad_checkpointing
    tokenizer = create_tokenizer(cfg, CAPTIONS)
    torch.manual_seed(0)
    model = create_model(cfg, tokenizer)
    spec = get_spec(name)
    if spec.load_weights is not None:
        spec.load_weights(model, cfg)
    # Layers that start at zero (so a new head starts as the identity) get no gradient through the
    # layers behind them at step 0; give them small random weights to test every parameter's path.
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.2)
    return model, tokenizer


def test_registry_is_not_empty() -> None:
    assert "tiny_dual_encoder" in list_models()


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_tiny_variant(name: str) -> None:
    model, tokenizer = _build(name)
    video = torch.randn(B, T, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))  # (B, T, C, H, W)
    input_ids, attention_mask = tokenizer(CAPTIONS)
    video_emb = model.encode_video(video)
    text_emb = model.encode_text(input_ids, attention_mask)
    assert video_emb.shape == text_emb.shape == (B, 16)
    torch.testing.assert_close(video_emb.norm(dim=-1), torch.ones(B))
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(B))

    # Symmetric InfoNCE written out here: models only return embeddings, the loss lives elsewhere.
    logits = 10.0 * video_emb @ text_emb.T
    target = torch.arange(B)
    (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} gets an all-zero gradient"


@pytest.mark.parametrize("name", list_models())
def test_video_tower_sees_frame_order(name: str) -> None:
    model, _ = _build(name)
    model.eval()
    video = torch.randn(2, T, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        forward = model.encode_video(video)
        reversed_ = model.encode_video(video.flip(1))  # same frames, played backwards
    assert (forward - reversed_).abs().max() > 1e-4


@pytest.mark.parametrize("name", list_models())
def test_gradient_checkpointing_keeps_the_exact_meta_gradient(name: str) -> None:
    """The exact meta step's virtual parameters exist for one forward only: a checkpointed block that
    recomputed itself in backward would run on the real weights instead and silently change the
    meta-gradient (4.5% on the tiny seqTransf CLIP before the fix). Virtual step over every parameter."""
    import math

    from mama.config import LossConfig, MetaConfig
    from mama.tasks.retrieval.module import RetrievalModule
    from mama.weighting import MetaWeighting, meta_forward_context

    updates = []
    for checkpointing in (False, True):
        model, tokenizer = _build(name, grad_checkpointing=checkpointing)
        task = RetrievalModule(model, LossConfig(margin=0.05, init_logit_scale=math.log(10))).train()

        def batch(texts: list[str], seed: int, tokenizer: Any = tokenizer) -> dict[str, torch.Tensor]:
            ids, mask = tokenizer(texts)
            video = torch.randn(len(texts), T, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
            return {"video": video, "input_ids": ids, "attention_mask": mask}

        torch.manual_seed(2)
        meta = MetaWeighting(
            MetaConfig(interval=1, zero_init=False, optimizer="sgd", lr=1.0, virtual_lr=1.0, virtual_params=[]), task
        )
        before = [p.detach().clone() for p in meta.wnet.parameters()]
        with meta_forward_context(True):
            losses = task(batch(CAPTIONS, seed=3))["loss_per_sample"]
            meta.step(task, losses, batch(CAPTIONS[::-1], seed=4), step=0)
        # SGD at lr 1 from a zero momentum buffer: the change of the net is its meta-gradient.
        updates.append([p.detach() - b for p, b in zip(meta.wnet.parameters(), before, strict=True)])
        assert max(u.abs().max().item() for u in updates[-1]) > 1e-7, "zero meta-gradient"
    for a, b in zip(*updates, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_too_many_frames_raises() -> None:
    model, _ = _build("tiny_dual_encoder")
    with pytest.raises(ValueError, match="at most 8"):
        model.encode_video(torch.zeros(1, 9, 3, SIZE, SIZE))


def test_unknown_model_lists_registered() -> None:
    tokenizer = WordTokenizer.build(CAPTIONS)
    with pytest.raises(KeyError, match="registered models: .*tiny_dual_encoder"):
        create_model(_tiny("no_such_model"), tokenizer)


# --- tokenizer --------------------------------------------------------------------------------------


def test_tokenizer_ids_and_mask() -> None:
    tok = WordTokenizer.build(CAPTIONS, max_length=12)
    ids, mask = tok(["a red circle", "a purple circle moves left !"])
    assert ids.shape == mask.shape == (2, 12) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert (ids[:, 0] == tok.cls_id).all()
    assert ids[0, :5].tolist() == [tok.cls_id, tok.index["a"], tok.index["red"], tok.index["circle"], tok.eos_id]
    assert (ids[0, 5:] == tok.pad_id).all()
    assert mask[0].tolist() == [True] * 5 + [False] * 7
    # "purple" and "!" never appear in the captions the vocabulary was built from.
    assert ids[1, 2].item() == tok.unk_id and ids[1, 6].item() == tok.unk_id
    assert ids[1, 7].item() == tok.eos_id


def test_tokenizer_truncates_but_keeps_eos() -> None:
    tok = WordTokenizer.build(CAPTIONS, max_length=5)
    ids, mask = tok([CAPTIONS[0]])
    assert ids[0].tolist() == [tok.cls_id, tok.index["a"], tok.index["small"], tok.index["red"], tok.eos_id]
    assert mask.all()


def test_tokenizer_save_load_round_trip(tmp_path: Path) -> None:
    cfg = _tiny("tiny_dual_encoder")
    tok = create_tokenizer(cfg, CAPTIONS)
    tok.save(tmp_path / "tok")
    loaded = load_tokenizer(cfg, tmp_path / "tok")
    texts = CAPTIONS + ["an unseen caption about a yellow diamond"]
    for a, b in zip(tok(texts), loaded(texts), strict=True):
        assert torch.equal(a, b)
    assert loaded.vocab == tok.vocab and loaded.max_length == tok.max_length
    with pytest.raises(FileNotFoundError):
        WordTokenizer.load(tmp_path / "missing")
