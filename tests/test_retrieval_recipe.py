"""The MSR-VTT recipe end to end on CPU: a tiny random CLIP, an MSR-VTT-layout fixture of generated MP4s
with a corrupt and a missing video, `mama train` then `mama eval`, LVLM captions and a held-out meta set."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mama.checkpoint import load_checkpoint
from mama.cli import main
from mama.config import load_config
from mama.data.video import write_video
from mama.tasks import train

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "msrvtt_clip_b32.yaml"
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 220),
    "white": (230, 230, 230),
    "black": (10, 10, 10),
}
SHAPES = ("circle", "square", "cross", "triangle")

pytestmark = pytest.mark.slow


def _video(path: Path, colour: tuple[int, int, int], seed: int) -> None:
    # 48x32 (not square: exercises the short-side resize and centre crop), a moving bright block.
    rng = np.random.default_rng(seed)
    frames = np.empty((10, 32, 48, 3), dtype=np.uint8)
    frames[:] = colour
    for t in range(10):
        x = (4 * t + int(rng.integers(0, 8))) % 40
        frames[t, 8:16, x : x + 8] = 255 - np.array(colour, dtype=np.uint8)
    write_video(path, frames, fps=5)


@pytest.fixture(scope="module")
def msrvtt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """MSR-VTT in CLIP4Clip's layout: 14 training videos (9k list), 4 test videos (1k-A CSV)."""
    root = tmp_path_factory.mktemp("msrvtt")
    ann, videos = root / "annotations", root / "videos" / "all"
    ann.mkdir()
    videos.mkdir(parents=True)
    names = list(COLOURS)
    sentences, train_ids, test_rows = [], [], []
    for i in range(18):
        vid = f"video{i}"
        colour, shape = names[i % len(names)], SHAPES[i % len(SHAPES)]
        _video(videos / f"{vid}.mp4", COLOURS[colour], i)
        captions = [f"a {colour} screen with a {shape}", f"a {shape} moves over {colour}"]
        sentences += [{"video_id": vid, "caption": c, "sen_id": len(sentences)} for c in captions]
        if i < 14:
            train_ids.append(vid)
        else:
            test_rows.append({"key": f"ret{i}", "vid_key": f"msr{i}", "video_id": vid, "sentence": captions[0]})
    (ann / "MSRVTT_data.json").write_text(
        json.dumps({"videos": [{"video_id": v} for v in train_ids], "sentences": sentences})
    )
    with (ann / "MSRVTT_train.9k.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["video_id"], *[[v] for v in train_ids]])
    with (ann / "MSRVTT_JSFUSION_test.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["key", "vid_key", "video_id", "sentence"])
        writer.writeheader()
        writer.writerows(test_rows)
    # LVLM captions, as `mama augment` writes them, for some training videos and one unknown id.
    lines = [
        {
            "video_id": v,
            "captions": [f"the video shows a moving shape number {v[5:]}", f"a clip of shape {v[5:]}"],
            "model": "tiny",
        }
        for v in train_ids
    ]
    lines.append({"video_id": "video999", "captions": ["not in this split"]})
    (root / "llava.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return {"root": root, "annotations": ann, "videos": root / "videos"}


def _overrides(data: dict[str, Path], tiny_clip_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.root={data['annotations']}",
        f"data.videos={data['videos']}",
        f"data.lvlm_captions=[{data['root'] / 'llava.jsonl'}]",
        f"model.pretrained={tiny_clip_dir}",
        "data.frame_size=32", "model.frame_size=32",
        "data.num_frames=4", "model.max_frames=4", "data.cached_frames=8",
        "data.workers=0", "data.meta_holdout=4",
        "model.max_text_length=16", "model.temporal_layers=1",
        "meta.batch_size=4", "train.batch_size=4", "train.steps=3",
        "train.precision=fp32", "train.device=cpu", "train.progress=false",
        "train.log_every=1", "train.checkpoint_every=0", "train.log_weights_every=0",
        "eval.batch_size=8", "optim.lr=1e-3", "optim.backbone_lr=1e-4",
        f"train.out_dir={out_dir}",
        *extra,
    ]  # fmt: skip


def _damaged_copy(data: dict[str, Path], dest: Path) -> tuple[dict[str, Path], Path, Path]:
    shutil.copytree(data["root"], dest)
    copy = {k: dest / v.relative_to(data["root"]) for k, v in data.items()}
    corrupt, missing = copy["videos"] / "all" / "video1.mp4", copy["videos"] / "all" / "video2.mp4"
    corrupt.write_bytes(corrupt.read_bytes()[:200])
    missing.unlink()
    return copy, corrupt, missing


def test_msrvtt_recipe_trains_and_evaluates_with_tiny_clip(
    msrvtt: dict[str, Path], tiny_clip_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, corrupt, missing = _damaged_copy(msrvtt, tmp_path / "data")
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", "--config", str(RECIPE), *_overrides(data, tiny_clip_dir, run)]) == 0
    messages = [str(w.message) for w in caught]
    assert any(str(corrupt) in m and "skipping video" in m for m in messages), messages
    # A missing video is reported at the path where it was expected (the videos folder, by id).
    assert any(f"{data['videos'] / missing.name}: video file not found" in m for m in messages), messages
    assert any("video999" in m for m in messages), "the unknown LVLM video id is reported"

    metrics = json.loads((run / "metrics.json").read_text())
    # Both bad training videos are counted (in train or in the held-out meta set), none in test.
    assert metrics["skipped_videos"]["train"] + metrics["skipped_videos"]["meta"] == 2
    assert metrics["skipped_videos"]["test"] == 0
    assert metrics["num_videos"] == 4 and metrics["num_queries"] == 4  # 1k-A: one query per test video
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    log = [r for r in lines if "loss" in r]
    assert [r["step"] for r in log] == [1, 2, 3]
    epochs = [r for r in lines if "epoch" in r]  # the epoch summaries count the skipped videos
    assert epochs and sum(epochs[-1]["skipped_videos"].values()) == 2
    assert all(np.isfinite(r["loss"]) for r in log)
    assert any("lvlm" in r["weight_by_source"] for r in log), "LVLM captions joined the training pools"

    # Backbone and new layers train at their own learning rates.
    ckpt = load_checkpoint(run / "checkpoints")
    lrs = sorted({g["initial_lr"] for g in ckpt.state["optimizer"]["param_groups"]})
    assert lrs == [1e-4, 1e-3]

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    for key in ("t2v_r1", "v2t_r1", "t2v_mnr"):
        assert evaluated[key] == pytest.approx(metrics[key]), key


def test_meta_holdout_is_the_same_for_every_variant(
    msrvtt: dict[str, Path], tiny_clip_dir: Path, tmp_path: Path
) -> None:
    from mama.tasks.retrieval.data import read_records

    cfg = load_config(RECIPE, _overrides(msrvtt, tiny_clip_dir, tmp_path / "run"))
    with_meta = read_records(cfg, Path(cfg.data.root), ("train", "meta"))
    cfg_plain = load_config(
        RECIPE, _overrides(msrvtt, tiny_clip_dir, tmp_path / "run", "meta.enabled=false", "train.seed=3")
    )
    plain = read_records(cfg_plain, Path(cfg.data.root), ("train",))
    train_ids = [r.id for r in with_meta["train"]]
    meta_ids = [r.id for r in with_meta["meta"]]
    assert len(meta_ids) == 4 and not set(meta_ids) & set(train_ids)
    assert [r.id for r in plain["train"]] == train_ids  # held out with or without meta weighting, any seed
    assert all(c.source == "human" for r in with_meta["meta"] for c in r.captions)


def _final_weights(run: Path) -> dict[str, Any]:
    return load_checkpoint(run / "checkpoints").tensors["task"]


def _write_png(path: Path, rgb: np.ndarray) -> None:
    import av

    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = rgb.shape[1], rgb.shape[0], "rgb24"
    packets = codec.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")) + codec.encode(None)
    path.write_bytes(b"".join(bytes(p) for p in packets))


def test_stream_decoding_workers_give_the_same_training(
    tiny_synthvl: Path, tiny_overrides: Any, tmp_path: Path
) -> None:
    """Decoding in worker processes changes where batches are built, not what they hold, including
    the replacement of videos that break mid-run and how they are counted."""
    from mama.data.clips import seeded_generator
    from mama.data.video import decode_frames

    root = tmp_path / "data"
    shutil.copytree(tiny_synthvl, root, ignore=shutil.ignore_patterns(".cache"))
    lines = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    # Two videos of the first batch become frame folders whose frames after the first are corrupt: they
    # pass the check when the split loads and fail when a batch decodes them.
    first_batch = torch.randperm(len(lines), generator=seeded_generator(0, 0, 0))[:16].tolist()
    broken = []
    for index in first_batch[:2]:
        folder = root / "videos" / f"broken_{index}"
        folder.mkdir()
        for t, rgb in enumerate(decode_frames(root / lines[index]["video"]).numpy()):
            if t == 0:
                _write_png(folder / f"frame_{t:03d}.png", rgb)
            else:
                (folder / f"frame_{t:03d}.png").write_bytes(b"not a png")
        lines[index]["video"] = f"videos/broken_{index}"
        broken.append(folder)
    (root / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    runs, skipped = {}, {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        cfg = load_config(
            None, tiny_overrides(root, out) + ["data.decode=stream", f"data.workers={workers}", "train.steps=3"]
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(cfg)
        if workers == 0:  # worker processes warn in their own stderr
            for folder in broken:
                # Caught mid-run (the load-time probe reads the intact first frame), by the decoder.
                assert any(
                    f"skipping video {folder}" in str(w.message) and "cannot decode frame image" in str(w.message)
                    for w in caught
                ), [str(w.message) for w in caught]
        runs[workers] = _final_weights(out)
        skipped[workers] = json.loads((out / "metrics.json").read_text())["skipped_videos"]
    assert skipped[0] == skipped[2] == {"train": 2, "val": 0, "test": 0}
    for name, value in runs[0].items():
        assert torch.equal(value, runs[2][name]), name
