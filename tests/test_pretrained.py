"""save_pretrained / from_pretrained for every kind of registered model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mama.config import ModelConfig
from mama.models import create_model, create_tokenizer, from_pretrained, get_spec, save_pretrained

CAPTIONS = [
    "a small red circle moves left on a black background",
    "a large blue square slides up across a white screen",
]


def _cfg(name: str, tiny_clip_dir: Path, temporal: str = "meanP") -> ModelConfig:
    if name == "clip":
        return ModelConfig(name="clip", pretrained=str(tiny_clip_dir), frame_size=32, max_frames=4,
                           max_text_length=16, temporal=temporal, temporal_layers=1)  # fmt: skip
    return ModelConfig(name=name, embed_dim=16, width=32, heads=2, video_layers=1, text_layers=1,
                       stem_channels=4, frame_size=32, max_frames=4, max_text_length=16)  # fmt: skip


def _trained(cfg: ModelConfig, seed: int = 0) -> tuple[nn.Module, object]:
    """A built model (pretrained weights loaded where the model has them) with every parameter moved, as
    training would: a round trip that dropped any tensor (e.g. zero-initialised ones) would then show."""
    tokenizer = create_tokenizer(cfg, CAPTIONS)
    torch.manual_seed(seed)
    model = create_model(cfg, tokenizer)
    load_weights = get_spec(cfg.name).load_weights
    if load_weights is not None:
        load_weights(model, cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval(), tokenizer


def _embeddings(model: nn.Module, tokenizer: object) -> tuple[torch.Tensor, torch.Tensor]:
    video = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(5))  # (B, T, C, H, W)
    with torch.no_grad():
        return model.encode_video(video), model.encode_text(*tokenizer(CAPTIONS))  # type: ignore[operator]


@pytest.mark.parametrize(
    ("name", "temporal"), [("clip", "meanP"), ("clip", "seqTransf"), ("tiny_dual_encoder", "meanP")]
)
def test_round_trip_gives_identical_embeddings(tiny_clip_dir: Path, tmp_path: Path, name: str, temporal: str) -> None:
    cfg = _cfg(name, tiny_clip_dir, temporal)
    model, tokenizer = _trained(cfg)
    folder = save_pretrained(tmp_path / "saved", cfg, model, tokenizer)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    assert json.loads((folder / "config.json").read_text())["mama_version"] == 1

    loaded_cfg, loaded, loaded_tokenizer = from_pretrained(folder)
    assert loaded_cfg == cfg and not loaded.training
    for a, b in zip(_embeddings(model, tokenizer), _embeddings(loaded, loaded_tokenizer), strict=True):
        assert torch.equal(a, b)


class _FailingTokenizer:
    def save(self, folder: Path) -> None:
        raise RuntimeError("disk full")


def test_save_replaces_an_existing_folder_atomically(tiny_clip_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg("tiny_dual_encoder", tiny_clip_dir)
    first, tokenizer = _trained(cfg, seed=0)
    second, _ = _trained(cfg, seed=1)
    folder = tmp_path / "saved"
    save_pretrained(folder, cfg, first, tokenizer)
    save_pretrained(folder, cfg, second, tokenizer)
    assert torch.equal(_embeddings(from_pretrained(folder)[1], tokenizer)[0], _embeddings(second, tokenizer)[0])
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]  # no temporary or old folders left behind

    # A save that fails half-way leaves the previous model untouched and cleans up after itself.
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(folder, cfg, first, _FailingTokenizer())
    assert torch.equal(_embeddings(from_pretrained(folder)[1], tokenizer)[0], _embeddings(second, tokenizer)[0])
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]


def test_clear_errors(tiny_clip_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.*folder not found"):
        from_pretrained(tmp_path / "nowhere")
    cfg = _cfg("tiny_dual_encoder", tiny_clip_dir)
    model, tokenizer = _trained(cfg)
    folder = save_pretrained(tmp_path / "saved", cfg, model, tokenizer)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors: missing"):
        from_pretrained(folder)

    folder = save_pretrained(tmp_path / "saved", cfg, model, tokenizer)
    (folder / "config.json").write_text(json.dumps({"mama_version": 1, "model": {"name": "clip", "layers": 3}}))
    with pytest.raises(ValueError, match="config.json.*model.layers"):
        from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"something": "else"}))
    with pytest.raises(ValueError, match="not a mama model config"):
        from_pretrained(folder)

    # Weights of another architecture: strict loading names the mismatch instead of half-loading.
    other = _cfg("tiny_dual_encoder", tiny_clip_dir)
    other.width = 64
    (folder / "config.json").write_text(json.dumps({"mama_version": 1, "model": other.__dict__}))
    with pytest.raises(RuntimeError, match="size mismatch"):
        from_pretrained(folder)

    (tmp_path / "a_file").write_text("")
    with pytest.raises(NotADirectoryError, match="a_file"):
        save_pretrained(tmp_path / "a_file", cfg, model, tokenizer)
