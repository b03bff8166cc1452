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


def _copy_videos(sources: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for path in sources:
        shutil.copy(path, folder / path.name)
    return folder


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_appending_a_folder_gives_the_index_of_both_at_once(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mama.inference.embed import list_inputs, open_index

    sources = sorted((trained["data"] / "videos").rglob("*.mp4"))
    first, second = _copy_videos(sources[:5], tmp_path / "first"), _copy_videos(sources[5:9], tmp_path / "second")
    shutil.copy(sources[2], second / sources[2].name)  # already in the index: skipped, not embedded twice
    model = str(trained["model"])
    embed = ["embed", "--model", model, "--out", str(tmp_path / "appended"), "--no-progress"]
    assert main([*embed, "--videos", str(first)]) == 0
    assert main([*embed, "--videos", str(second), "--append"]) == 0
    encoder = Encoder.from_pretrained(trained["model"])
    both = list_inputs(videos=first)[0]
    both += [(vid, path) for vid, path in list_inputs(videos=second)[0] if vid not in dict(both)]
    info = build_index(encoder, both, tmp_path / "one_go", progress=False)
    appended = _folder_bytes(tmp_path / "appended")
    assert appended == _folder_bytes(tmp_path / "one_go"), "embeddings, rows, FAISS index and manifest are equal"
    assert sorted(appended) == ["failed.txt", "index.json", "videos.faiss", "videos.jsonl", "videos.safetensors"]
    assert info["num_videos"] == 9 and info["vector_index"]["type"] == "flat"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["appended", "first", "one_go", "second"], "no leftovers"
    ivf = ["embed", "--model", model, "--out", str(tmp_path / "ivf"), "--no-progress"]
    assert main([*ivf, "--videos", str(first), "--index-type", "ivf"]) == 0
    assert main([*ivf, "--videos", str(second), "--append"]) == 0  # keeps the index's type
    ivf_info = build_index(encoder, both, tmp_path / "ivf_one_go", progress=False, index_type="ivf")
    assert ivf_info["vector_index"]["type"] == "ivf", "an IVF's cells are trained on all videos, as in one go"
    assert _folder_bytes(tmp_path / "ivf") == _folder_bytes(tmp_path / "ivf_one_go")

    index = open_index(tmp_path / "appended")
    assert len(index) == 9 and [r["id"] for r in index.rows] == [vid for vid, _ in both]
    _, emb, _ = load_index(tmp_path / "appended")
    found = index.search_vectors(emb[[0, 8]], k=3)  # a video query finds that video first
    assert [hits[0]["id"] for hits in found] == [both[0][0], both[8][0]] and found[0][0]["score"] > 0.999
    query = "a red circle moves left"
    assert index.search_texts(query, encoder, k=9) == search(tmp_path / "one_go", [query], top_k=9)
    capsys.readouterr()
    assert main(["search", query, "--index", str(tmp_path / "appended"), "--top-k", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)[0]["results"]
    assert [h["id"] for h in printed] == [h["id"] for h in index.search_texts(query, k=2)[0]]


def test_append_refuses_an_index_of_another_frame_count(trained: dict[str, Path], tmp_path: Path) -> None:
    from mama.inference.embed import IndexIntegrityError, list_inputs

    sources = sorted((trained["data"] / "videos").rglob("*.mp4"))
    videos = list_inputs(videos=_copy_videos(sources[:3], tmp_path / "videos"))[0]
    build_index(Encoder.from_pretrained(trained["model"]), videos[:2], tmp_path / "index", progress=False)
    before = _folder_bytes(tmp_path / "index")
    other = Encoder.from_pretrained(trained["model"], num_frames=2)
    with pytest.raises(IndexIntegrityError) as refused:
        build_index(other, videos[2:], tmp_path / "index", progress=False, append=True)
    message = str(refused.value)
    assert str(tmp_path / "index" / "index.json") in message and "cannot append to this index" in message
    assert "settings differ (num_frames 4 when built, 2 now)" in message
    assert _folder_bytes(tmp_path / "index") == before


def test_an_interrupted_append_leaves_the_old_index(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mama.inference.embed import list_inputs
    from mama.inference.vector_index import VectorIndex

    sources = sorted((trained["data"] / "videos").rglob("*.mp4"))
    videos = list_inputs(videos=_copy_videos(sources[:6], tmp_path / "videos"))[0]
    encoder = Encoder.from_pretrained(trained["model"])
    build_index(encoder, videos[:3], tmp_path / "index", progress=False)
    before = _folder_bytes(tmp_path / "index")

    real_save = VectorIndex.save

    def killed(self: VectorIndex, path: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(VectorIndex, "save", killed)
    with pytest.raises(KeyboardInterrupt):  # killed while writing the new index
        build_index(encoder, videos, tmp_path / "index", part_size=2, progress=False, append=True)
    assert _folder_bytes(tmp_path / "index") == before and load_index(tmp_path / "index")[0]["num_videos"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "videos"], "the half-written copy is gone"

    monkeypatch.setattr(VectorIndex, "save", real_save)
    calls: list[int] = []
    real_encode = Encoder.encode_videos

    def counting(self: Encoder, paths: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(paths))
        return real_encode(self, paths, *args, **kwargs)

    monkeypatch.setattr(Encoder, "encode_videos", counting)
    info = build_index(encoder, videos, tmp_path / "index", part_size=2, progress=False, append=True)
    assert calls == [], "the finished parts of the interrupted append are reused"
    assert info["num_videos"] == 6 and not (tmp_path / "index" / "parts").exists()
    torch.testing.assert_close(load_index(tmp_path / "index")[1], real_encode(encoder, [p for _, p in videos])[0])
