"""The video QA model and task on a tiny from-scratch encoder (and the tiny CLIP's token features)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mama.config import LossConfig, MetaConfig, ModelConfig
from mama.losses import angular_margin_nce
from mama.models import create_model, create_tokenizer, get_spec
from mama.models.qa import QAConfig, VideoQAModel
from mama.tasks.qa.module import QAModule
from mama.weighting import MetaWeighting, meta_forward_context, normalize_weights

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = ["what color is the shape", "what shape is it"]
CANDIDATES = ["red", "blue", "green", "circle", "square", "cross"]
CAPTIONS = ["a small red circle moves left", "a blue square slides up", "the green cross drifts down"]
T, SIZE, WIDTH = 2, 16, 32


def _encoder() -> torch.nn.Module:
    cfg = ModelConfig(
        name="tiny_dual_encoder", embed_dim=16, width=WIDTH, heads=2, video_layers=1, text_layers=1,
        stem_channels=4, frame_size=SIZE, max_frames=8, max_text_length=16,
    )  # fmt: skip
    tokenizer = create_tokenizer(cfg, QUESTIONS + CANDIDATES + CAPTIONS)
    torch.manual_seed(0)
    return create_model(cfg, tokenizer), tokenizer


def _qa(answer_format: str = "open", num_answers: int = 4, **overrides: object):
    encoder, tokenizer = _encoder()
    fields = {"num_answers": num_answers, "fusion_layers": 1, "fusion_width": 32, "fusion_heads": 2, "dropout": 0.0,
              "answer_format": answer_format}  # fmt: skip
    fields.update(overrides)
    torch.manual_seed(1)
    return VideoQAModel(encoder, QAConfig(**fields)), tokenizer


def _videos(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, T, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))  # (B, T, C, H, W)


def _mc_text(tokenizer, rows: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """rows[b][c] texts -> input_ids, attention_mask (B, C, L)."""
    b, c = len(rows), len(rows[0])
    ids, mask = tokenizer([text for row in rows for text in row])
    return ids.view(b, c, -1), mask.view(b, c, -1)  # (B*C, L) -> (B, C, L)


# --- the encoders' token features ------------------------------------------------------------------


def test_tiny_encoder_token_features() -> None:
    encoder, tokenizer = _encoder()
    video = _videos(3)
    ids, mask = tokenizer(CAPTIONS)
    video_tokens = encoder.video_tokens(video)
    text_tokens = encoder.text_tokens(ids, mask)
    assert video_tokens.shape == (3, 1 + T, encoder.video_token_dim) and encoder.video_token_dim == WIDTH
    assert text_tokens.shape == (3, ids.shape[1], encoder.text_token_dim) and encoder.text_token_dim == WIDTH
    # The [CLS] token of each sequence is what the embedding heads read: same embeddings as before.
    torch.testing.assert_close(encoder.pool_video_tokens(video_tokens), encoder.encode_video(video))
    torch.testing.assert_close(
        F.normalize(encoder.text.head(text_tokens[:, 0]), dim=-1), encoder.encode_text(ids, mask)
    )


def test_clip_token_features(tiny_clip_dir: Path) -> None:
    cfg = ModelConfig(name="clip", pretrained=str(tiny_clip_dir), frame_size=32, max_frames=4, max_text_length=16,
                      temporal="seqTransf", temporal_layers=1)  # fmt: skip
    tokenizer = create_tokenizer(cfg, CAPTIONS)
    torch.manual_seed(0)
    encoder = create_model(cfg, tokenizer)
    get_spec("clip").load_weights(encoder, cfg)
    video = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # (B, T, C, H, W)
    ids, mask = tokenizer(CAPTIONS[:2])
    video_tokens = encoder.video_tokens(video)
    text_tokens = encoder.text_tokens(ids, mask)
    assert video_tokens.shape == (2, 3, encoder.video_token_dim) and encoder.video_token_dim == 16  # projection_dim
    assert text_tokens.shape == (2, 16, encoder.text_token_dim) and encoder.text_token_dim == 32  # hidden_size
    assert torch.equal(encoder.pool_video_tokens(video_tokens), encoder.encode_video(video))

    qa = VideoQAModel(encoder, QAConfig(num_answers=5, fusion_layers=1, fusion_width=32, fusion_heads=2))
    assert qa.open_logits(video, ids, mask).shape == (2, 5)
    mc = VideoQAModel(encoder, QAConfig(fusion_layers=1, fusion_width=32, fusion_heads=2, answer_format="mc"))
    mc_ids, mc_mask = _mc_text(tokenizer, [CAPTIONS, CAPTIONS[::-1]])
    assert mc.mc_scores(video, mc_ids, mc_mask).shape == (2, 3)


# --- the fusion model ------------------------------------------------------------------------------


def test_open_logits_and_fuse_shapes() -> None:
    qa, tokenizer = _qa("open", num_answers=7)
    ids, mask = tokenizer(CAPTIONS)
    assert qa.fuse(_videos(3), ids, mask).shape == (3, 32)
    assert qa.open_logits(_videos(3), ids, mask).shape == (3, 7)
    with pytest.raises(RuntimeError, match="no multiple-choice head"):
        qa.mc_scores(_videos(3), ids[:, None], mask[:, None])


def test_mc_scores_encode_each_video_once() -> None:
    qa, tokenizer = _qa("mc")
    b, c = 2, 3
    ids, mask = _mc_text(tokenizer, [[f"{QUESTIONS[0]} {a}" for a in CANDIDATES[:c]]] * b)
    frames_seen: list[int] = []
    texts_seen: list[int] = []
    qa.encoder.video.stem.register_forward_hook(lambda m, inp, out: frames_seen.append(inp[0].shape[0]))
    qa.encoder.text.embed.register_forward_hook(lambda m, inp, out: texts_seen.append(inp[0].shape[0]))
    scores = qa.mc_scores(_videos(b), ids, mask)
    assert scores.shape == (b, c)
    assert frames_seen == [b * T]  # one video pass, B videos: not B * C
    assert texts_seen == [b * c]  # every candidate text encoded


def test_mc_scores_equal_fusing_each_candidate_alone() -> None:
    """The shared-video expansion pairs candidate c of sample b with video b (no mix-up of the order)."""
    qa, tokenizer = _qa("mc")
    rows = [[f"{QUESTIONS[0]} {a}" for a in CANDIDATES[:3]], [f"{QUESTIONS[1]} {a}" for a in CANDIDATES[3:]]]
    ids, mask = _mc_text(tokenizer, rows)
    video = _videos(2)
    scores = qa.mc_scores(video, ids, mask)
    for b in range(2):
        for c in range(3):
            alone = qa.mc_head(qa.fuse(video[b : b + 1], ids[b, c][None], mask[b, c][None]))
            torch.testing.assert_close(scores[b, c], alone[0, 0])


def test_padded_text_tokens_are_ignored() -> None:
    qa, tokenizer = _qa("open")
    ids, mask = tokenizer(CAPTIONS)
    noisy = ids.clone()
    noisy[~mask] = 5  # a real word id where the mask says padding
    video = _videos(3)
    torch.testing.assert_close(qa.open_logits(video, noisy, mask), qa.open_logits(video, ids, mask))


# --- learning --------------------------------------------------------------------------------------


def _fit(task: QAModule, batch: dict, predict, steps: int = 400, lr: float = 3e-3) -> float:
    """Adam on one batch until every training answer is right; returns the final accuracy in percent."""
    optimizer = torch.optim.Adam(task.parameters(), lr=lr)
    torch.manual_seed(2)
    for _ in range(steps):
        out = task(batch)
        if bool((predict(out) == batch["answer"]).all()):
            break
        optimizer.zero_grad()
        out["loss_per_sample"].mean().backward()
        optimizer.step()
    with torch.no_grad():
        return 100.0 * float((predict(task(batch)) == batch["answer"]).float().mean())


def test_open_ended_overfits_eight_pairs() -> None:
    """4 videos x 2 questions, the answer depends on both: the fusion must combine them."""
    qa, tokenizer = _qa("open", num_answers=6)
    video = _videos(4).repeat_interleave(2, dim=0)  # (8, T, C, H, W): video v for both questions
    ids, mask = tokenizer(QUESTIONS * 4)
    answer = torch.tensor([0, 3, 1, 4, 2, 5, 0, 4])  # (color, shape) per video
    task = QAModule(qa, LossConfig())
    batch = {"video": video, "input_ids": ids, "attention_mask": mask, "answer": answer}
    assert _fit(task, batch, lambda out: out["logits"].argmax(dim=1)) == 100.0


def test_multiple_choice_overfits_six_samples() -> None:
    qa, tokenizer = _qa("mc")
    video = _videos(3).repeat_interleave(2, dim=0)  # (6, T, C, H, W)
    colors, shapes = CANDIDATES[:3], CANDIDATES[3:]
    rows = [[f"{QUESTIONS[i % 2]} {a}" for a in (colors if i % 2 == 0 else shapes)] for i in range(6)]
    ids, mask = _mc_text(tokenizer, rows)  # (6, 3, L)
    answer = torch.tensor([0, 2, 1, 0, 2, 1])
    task = QAModule(qa, LossConfig())
    batch = {"video": video, "input_ids": ids, "attention_mask": mask, "answer": answer}
    assert _fit(task, batch, lambda out: out["scores"].argmax(dim=1)) == 100.0


# --- per-sample losses and weights -----------------------------------------------------------------


def _open_batch(tokenizer, n: int = 5, captions: bool = False) -> dict:
    ids, mask = tokenizer([QUESTIONS[i % 2] for i in range(n)])
    batch = {"video": _videos(n, seed=3), "input_ids": ids, "attention_mask": mask, "answer": torch.arange(n) % 4}
    if captions:
        batch["caption_ids"], batch["caption_mask"] = tokenizer([CAPTIONS[i % 3] for i in range(n)])
    return batch


def _rows(batch: dict, keep: list[int]) -> dict:
    return {k: v[keep] for k, v in batch.items()}


def _grads(task: QAModule, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in task.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def test_zero_weight_removes_a_sample_and_weights_change_the_gradient() -> None:
    qa, tokenizer = _qa("open")
    task = QAModule(qa, LossConfig())
    batch = _open_batch(tokenizer)
    weights = normalize_weights(torch.tensor([0.9, 0.2, 0.7, 0.4, 0.6]))  # as MetaWeighting gives them
    weights[2] = 0.0
    weighted = _grads(task, (weights * task(batch)["loss_per_sample"]).sum())
    keep = [0, 1, 3, 4]
    without = _grads(task, (weights[keep] * task(_rows(batch, keep))["loss_per_sample"]).sum())
    for a, b in zip(weighted, without, strict=True):
        torch.testing.assert_close(a, b)
    uniform = _grads(task, task(batch)["loss_per_sample"].mean())
    assert any(not torch.allclose(a, b) for a, b in zip(weighted, uniform, strict=True))


def test_contrastive_term_only_on_rows_with_a_caption() -> None:
    qa, tokenizer = _qa("open", contrastive_weight=0.25)
    task = QAModule(qa, LossConfig(margin=0.05))
    batch = _open_batch(tokenizer, n=4, captions=True)
    batch["has_caption"] = torch.tensor([True, False, True, True])
    out = task(batch)
    assert out["contrastive_loss"].shape == out["answer_loss"].shape == out["loss_per_sample"].shape == (4,)
    assert out["contrastive_loss"][1] == 0
    torch.testing.assert_close(out["loss_per_sample"], out["answer_loss"] + 0.25 * out["contrastive_loss"])

    # The captioned rows' loss is the angular margin loss among those rows alone.
    rows = [0, 2, 3]
    expected = angular_margin_nce(
        qa.encoder.encode_video(batch["video"][rows]),
        qa.encoder.encode_text(batch["caption_ids"][rows], batch["caption_mask"][rows]),
        task.logit_scale(), 0.05, reduction="none",
    )  # fmt: skip
    torch.testing.assert_close(out["contrastive_loss"][rows], expected)

    # The uncaptioned row's caption text is not a negative for anyone, and its loss never reaches the
    # caption path (the text embedding head is used by encode_text only).
    other = dict(batch)
    other["caption_ids"] = batch["caption_ids"].clone()
    other["caption_ids"][1] = batch["caption_ids"][0]
    torch.testing.assert_close(task(other)["loss_per_sample"], out["loss_per_sample"])
    head = qa.encoder.text.head.weight
    (g1,) = torch.autograd.grad(out["loss_per_sample"][1], head, retain_graph=True, allow_unused=True)
    (g0,) = torch.autograd.grad(out["loss_per_sample"][0], head, allow_unused=True)
    assert g1 is None or not g1.any()
    assert g0 is not None and g0.abs().sum() > 0


def test_without_captions_there_is_no_contrastive_term() -> None:
    qa, tokenizer = _qa("open")
    out = QAModule(qa, LossConfig())(_open_batch(tokenizer))
    assert "contrastive_loss" not in out
    torch.testing.assert_close(out["loss_per_sample"], out["answer_loss"])


def test_every_parameter_learns_from_a_captioned_batch() -> None:
    qa, tokenizer = _qa("open")
    task = QAModule(qa, LossConfig())
    task(_open_batch(tokenizer, captions=True))["loss_per_sample"].mean().backward()
    for name, p in task.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), name


def test_out_of_vocabulary_training_answer_is_an_error() -> None:
    qa, tokenizer = _qa("open")
    batch = _open_batch(tokenizer)
    batch["answer"] = torch.tensor([0, 1, -1, 2, 3])
    with pytest.raises(ValueError, match="dropped by the dataset layer"):
        QAModule(qa, LossConfig())(batch)


def test_meta_weighting_step_on_the_qa_task() -> None:
    """MetaWeighting differentiates through the fusion model's virtual step and updates its net."""
    qa, tokenizer = _qa("open")
    task = QAModule(qa, LossConfig())
    # The retrieval default (the encoder's embedding heads) is not on the answer path: take the fusion.
    meta_cfg = MetaConfig(enabled=True, interval=1, lr=1e-2, virtual_params=["model.open_head", "model.blocks"])
    meta = MetaWeighting(meta_cfg, task)
    before = [p.detach().clone() for p in meta.wnet.parameters()]
    with meta_forward_context(True):
        out = task(_open_batch(tokenizer))
        result = meta.step(task, out["loss_per_sample"], _open_batch(tokenizer, n=3), step=0)
    assert result.meta_loss is not None and torch.isfinite(torch.tensor(result.meta_loss))
    assert result.weights.shape == (5,)
    assert any(not torch.equal(a, b) for a, b in zip(before, meta.wnet.parameters(), strict=True))
