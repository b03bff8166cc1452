"""Embedding API and search: `mama export`, `mama embed`, `mama search` on a model trained on tiny SynthVL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from mama.cli import main
from mama.config import load_config
from mama.data.records import read_jsonl
from mama.inference.embed import Encoder, build_index, load_index, search
from mama.tasks import load_run, train
from mama.tasks.retrieval import encode_clipset, load_data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tiny_synthvl: Path, tiny_overrides: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model trained for 150 steps (t2v R@10 ~ 95% on the 30 test videos), and its export."""
    out = tmp_path_factory.mktemp("embed")
    cfg = load_config(
        None, tiny_overrides(tiny_synthvl, out / "run") + ["train.steps=150", "optim.lr=2e-3", "train.log_every=50"]
    )
    train(cfg)
    assert main(["export", "--checkpoint", str(out / "run"), "--out", str(out / "model")]) == 0
    return {"run": out / "run", "model": out / "model", "data": tiny_synthvl, "out": out}


def test_encoder_embeds_exactly_like_evaluation(trained: dict[str, Path]) -> None:
    run = load_run(trained["run"])
    cfg = run.cfg
    clips = load_data(cfg, ("test",), tokenizer=run.task.tokenizer, progress=False).splits["test"]
    video_emb, text_emb = encode_clipset(run.module, clips, cfg.data.num_frames, batch_size=7)
    for source in ("model", "run"):  # the exported folder and the run folder load the same model
        encoder = Encoder.from_pretrained(trained[source])
        videos, failed = encoder.encode_videos([r.video for r in clips.records], batch_size=5)
        assert failed == []
        torch.testing.assert_close(videos, video_emb, atol=1e-5, rtol=0)
        torch.testing.assert_close(encoder.encode_texts(clips.caption_text, batch_size=11), text_emb, atol=1e-5, rtol=0)


def test_embed_and_search_find_each_captions_own_video(
    trained: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    index = trained["out"] / "index"
    annotations = trained["data"] / "test.jsonl"
    assert (
        main(
            [
                "embed",
                "--model",
                str(trained["model"]),
                "--annotations",
                str(annotations),
                "--texts",
                "--out",
                str(index),
                "--no-progress",
            ]
        )
        == 0
    )
    info, video_emb, rows = load_index(index)
    records = read_jsonl(annotations)
    assert info["num_videos"] == len(rows) == len(records) == video_emb.shape[0] and info["num_failed"] == 0
    assert info["num_texts"] == sum(len(r.captions) for r in records if r.captions)

    queries = [(r.id, c.text) for r in records for c in r.captions if c.source == "human"]
    results = search(index, [text for _, text in queries], top_k=10)
    hits = [own in [hit["id"] for hit in found] for (own, _), found in zip(queries, results, strict=True)]
    assert sum(hits) / len(hits) >= 0.85, f"own video in the top 10 for only {sum(hits)} of {len(hits)} captions"
    for found in results:
        scores = [hit["score"] for hit in found]
        assert scores == sorted(scores, reverse=True) and [h["rank"] for h in found] == list(range(1, 11))

    capsys.readouterr()
    assert main(["search", queries[0][1], "--index", str(index), "--top-k", "3", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed[0]["query"] == queries[0][1] and [h["id"] for h in printed[0]["results"]] == [
        h["id"] for h in results[0][:3]
    ]


def test_embedding_a_folder_is_resumable_and_skips_bad_videos(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "videos"
    sources = sorted((trained["data"] / "videos").rglob("*.mp4"))[:10]
    folder.mkdir()
    for path in sources:
        shutil.copy(path, folder / path.name)
    bad = folder / sources[3].name
    bad.write_bytes(b"not a video")
    encoder = Encoder.from_pretrained(trained["model"])
    from mama.inference.embed import list_inputs

    videos, _ = list_inputs(videos=folder)
    assert len(videos) == 10

    calls = []
    real = Encoder.encode_videos

    def crash_on_third_part(self: Encoder, paths: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(paths))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the job is killed while embedding its third part
        return real(self, paths, *args, **kwargs)

    monkeypatch.setattr(Encoder, "encode_videos", crash_on_third_part)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match=f"skipping video {bad}"):
        build_index(encoder, videos, tmp_path / "index", part_size=4, progress=False)
    calls.clear()
    info = build_index(encoder, videos, tmp_path / "index", part_size=4, progress=False)
    assert calls == [2], "only the part in flight is embedded again"
    _, emb, rows = load_index(tmp_path / "index")
    assert info["num_videos"] == 9 and info["num_failed"] == 1 and emb.shape[0] == 9
    assert bad.stem not in [r["id"] for r in rows]
    assert str(bad) in (tmp_path / "index" / "failed.txt").read_text()
    reference, _ = real(encoder, [p for _, p in videos if p != bad])
    torch.testing.assert_close(emb, reference)


def test_clip_encoder_uses_the_models_own_width(tiny_clip_dir: Path, tiny_synthvl: Path, tmp_path: Path) -> None:
    """CLIP's embedding width is its projection size (16 here), whatever model.embed_dim says."""
    from mama.config import ModelConfig
    from mama.models import create_model, create_tokenizer, save_pretrained

    cfg = ModelConfig(name="clip", pretrained=str(tiny_clip_dir), frame_size=32, max_frames=4, max_text_length=16)
    assert cfg.embed_dim != 16
    tokenizer = create_tokenizer(cfg, [])
    save_pretrained(tmp_path / "clip", cfg, create_model(cfg, tokenizer), tokenizer, extra={"data": {"num_frames": 4}})
    encoder = Encoder.from_pretrained(tmp_path / "clip")
    paths = sorted((tiny_synthvl / "videos").rglob("*.mp4"))[:3]
    videos, failed = encoder.encode_videos(paths, batch_size=2)
    assert failed == [] and videos.shape == (3, 16) and torch.isfinite(videos).all()
    assert encoder.encode_texts(["a red circle"]).shape == (1, 16) and encoder.encode_texts([]).shape == (0, 16)
