"""`mama keyframes`, `mama caption` and `mama augment` end to end with a tiny random LLaVA: well-formed
output, bad videos in the sidecar, resume after a kill, shards merged."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mama.augment.captioner import CaptionConfig, LlavaCaptioner
from mama.augment.job import KeyframeConfig, augment, merge, shard_output
from mama.cli import main
from mama.data.records import read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
# A random tiny model writes gibberish: the length and repetition filters would drop most of it.
NO_FILTERS = ["--min-words", "0", "--max-words", "0", "--repeat-ngram", "0"]
SMALL = ["--tile-size", "32", "--max-new-tokens", "8", "--num-captions", "2"]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_keyframes_command(tiny_synthvl: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    video = read_jsonl(tiny_synthvl / "test.jsonl")[0].video
    assert (
        main(
            [
                "keyframes",
                str(video),
                "--num",
                "6",
                "--json",
                "--grid",
                str(tmp_path / "grid.png"),
                "--rows",
                "2",
                "--cols",
                "3",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"video", "num_frames", "fps", "peaks", "keyframes"}
    assert len(printed["keyframes"]) == 6 and printed["keyframes"] == sorted(printed["keyframes"])
    from mama.data.video import decode_frames

    grid = decode_frames(tmp_path / "grid.png")  # a one-frame "video"
    assert grid.shape == (1, 2 * 224, 3 * 224, 3)


def test_caption_command_prints_captions(
    tiny_synthvl: Path, tiny_llava_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    video = read_jsonl(tiny_synthvl / "test.jsonl")[0].video
    assert main(["caption", str(video), "--model", str(tiny_llava_dir), *NO_FILTERS, *SMALL]) == 0
    captions = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert 1 <= len(captions) <= 2


def test_augment_writes_one_line_per_video_and_lists_bad_ones(
    tiny_synthvl: Path, tiny_llava_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_synthvl, data, ignore=shutil.ignore_patterns(".cache"))
    records = read_jsonl(data / "test.jsonl")
    records[3].video.write_bytes(b"broken")
    out = tmp_path / "llava.jsonl"
    args = [
        "augment",
        str(data / "test.jsonl"),
        "--out",
        str(out),
        "--model",
        str(tiny_llava_dir),
        "--no-progress",
        *NO_FILTERS,
        *SMALL,
    ]
    with pytest.warns(UserWarning, match=f"skipping video {records[3].video}"):
        assert main(args) == 0
    lines = _lines(out)
    assert [line["video_id"] for line in lines] == [r.id for i, r in enumerate(records) if i != 3]
    for line in lines:
        assert set(line) == {
            "video_id",
            "video",
            "captions",
            "model",
            "prompt",
            "generation",
            "keyframe",
            "keyframes",
            "num_frames",
        }
        assert line["generation"]["dtype"] == "float32" and line["keyframe"]["num"] == 12
        assert (
            line["model"] == str(tiny_llava_dir)
            and line["prompt"] == "In a sentence, describe the process in the video."
        )
        assert line["generation"]["temperature"] == 0.2 and line["generation"]["num_captions"] == 2
        assert len(line["keyframes"]) == 12 and all(isinstance(c, str) and c for c in line["captions"])
    bad = _lines(out.with_name("llava.bad.jsonl"))
    assert [b["video_id"] for b in bad] == [records[3].id] and str(records[3].video) in bad[0]["error"]

    # A re-run has nothing left to do (the bad video is not retried either), and the file plugs into training.
    before = out.read_bytes()
    assert main(args) == 0
    assert out.read_bytes() == before
    from mama.data.records import read_lvlm_captions

    assert set(read_lvlm_captions(out)) == {line["video_id"] for line in lines}


def test_killed_augment_resumes_with_every_video_exactly_once(
    tiny_synthvl: Path, tiny_llava_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "llava.jsonl"
    annotations = tiny_synthvl / "train.jsonl"
    args = [
        "augment", str(annotations), "--out", str(out), "--model", str(tiny_llava_dir), "--batch-size", "2",
        "--no-progress", *NO_FILTERS, *SMALL,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mama.cli", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_bytes().count(b"\n") >= 6):
            assert proc.poll() is None, (
                f"augment exited early: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}"
            )
            assert time.monotonic() < deadline, "no output within 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    written = _lines(out)  # whole lines only: each batch is one write
    total = len(read_jsonl(annotations))
    assert 6 <= len(written) < total, "the kill came too late to test a resume"

    assert main(args) == 0
    ids = [line["video_id"] for line in _lines(out)]
    assert len(ids) == len(set(ids)) == total
    assert ids[: len(written)] == [line["video_id"] for line in written]  # nothing rewritten


def _tiny_cfg(folder: Path, **kwargs: Any) -> CaptionConfig:
    return CaptionConfig(model=str(folder), min_words=0, max_words=0, repeat_ngram=0, max_new_tokens=8, **kwargs)


def test_torn_last_line_is_cut_off_on_resume(tiny_synthvl: Path, tiny_llava_dir: Path, tmp_path: Path) -> None:
    records = read_jsonl(tiny_synthvl / "test.jsonl")[:4]
    out = tmp_path / "llava.jsonl"
    cfg, keyframes = _tiny_cfg(tiny_llava_dir), KeyframeConfig(tile_short_side=32)
    augment(records[:1], out, cfg, keyframes, progress=False)
    with out.open("a") as handle:
        handle.write('{"video_id": "' + records[1].id + '", "capt')  # the machine died mid-write
    with pytest.warns(UserWarning, match="torn last line"):
        summary = augment(records, out, cfg, keyframes, progress=False)
    assert summary["already_done"] == 1 and summary["captioned"] == 3
    assert [line["video_id"] for line in _lines(out)] == [r.id for r in records]


def test_resuming_with_other_settings_is_refused(tiny_synthvl: Path, tiny_llava_dir: Path, tmp_path: Path) -> None:
    records = read_jsonl(tiny_synthvl / "test.jsonl")[:2]
    out = tmp_path / "llava.jsonl"
    augment(records[:1], out, _tiny_cfg(tiny_llava_dir), KeyframeConfig(tile_short_side=32), progress=False)
    with pytest.raises(ValueError, match="other settings.*prompt"):
        augment(
            records,
            out,
            _tiny_cfg(tiny_llava_dir, prompt="Describe it."),
            KeyframeConfig(tile_short_side=32),
            progress=False,
        )
    with pytest.raises(ValueError, match="other settings.*keyframe"):
        augment(
            records, out, _tiny_cfg(tiny_llava_dir), KeyframeConfig(tile_short_side=32, threshold=0.3), progress=False
        )
    # Batching and precision do not make captions incomparable.
    augment(records, out, _tiny_cfg(tiny_llava_dir, batch_size=1), KeyframeConfig(tile_short_side=32), progress=False)
    assert len(_lines(out)) == 2


def test_bad_settings_fail_before_any_video_and_unexpected_errors_are_per_video(
    tiny_synthvl: Path, tiny_llava_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="16 keyframes need a grid"):
        KeyframeConfig(num=16)
    with pytest.raises(ValueError, match="threshold"):
        KeyframeConfig(threshold=1.0)
    records = read_jsonl(tiny_synthvl / "test.jsonl")[:3]
    import mama.augment.job as job

    real = job.decode_frames

    def flaky(path: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(path) == records[1].video:
            raise RuntimeError("out of memory in the decoder")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(job, "decode_frames", flaky)
    out = tmp_path / "llava.jsonl"
    with pytest.warns(UserWarning, match="RuntimeError: out of memory"):
        summary = augment(records, out, _tiny_cfg(tiny_llava_dir), KeyframeConfig(tile_short_side=32), progress=False)
    assert (summary["captioned"], summary["bad"]) == (2, 1)
    assert "RuntimeError" in _lines(out.with_name("llava.bad.jsonl"))[0]["error"]


def test_a_sharded_job_does_not_redo_an_unsharded_runs_videos(
    tiny_synthvl: Path, tiny_llava_dir: Path, tmp_path: Path
) -> None:
    records = read_jsonl(tiny_synthvl / "test.jsonl")[:6]
    out = tmp_path / "llava.jsonl"
    cfg, keyframes = _tiny_cfg(tiny_llava_dir), KeyframeConfig(tile_short_side=32)
    augment(records[:4], out, cfg, keyframes, progress=False)  # an unsharded run, interrupted after 4
    captioner = LlavaCaptioner(cfg)
    shards = [
        augment(records, out, cfg, keyframes, shard=(i, 2), progress=False, captioner=captioner) for i in range(2)
    ]
    assert sum(s["captioned"] for s in shards) == 2 and sum(s["already_done"] for s in shards) == 4
    assert sorted(line["video_id"] for i in range(2) for line in _lines(shard_output(out, (i, 2)))) == sorted(
        r.id for r in records[4:]
    )


def test_shards_merged_equal_an_unsharded_run(
    tiny_synthvl: Path, tiny_llava_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = read_jsonl(tiny_synthvl / "val.jsonl")
    cfg = _tiny_cfg(tiny_llava_dir, batch_size=3)
    captioner = LlavaCaptioner(cfg)
    keyframes = KeyframeConfig(tile_short_side=32)
    whole = augment(records, tmp_path / "whole.jsonl", cfg, keyframes, progress=False, captioner=captioner)
    out = tmp_path / "sharded.jsonl"
    for index in range(3):
        augment(records, out, cfg, keyframes, shard=(index, 3), progress=False, captioner=captioner)
        assert shard_output(out, (index, 3)).exists()
    assert main(["augment", "--merge", "--out", str(out)]) == 0  # finds the shard files next to --out
    assert json.loads(capsys.readouterr().out)["videos"] == whole["captioned"] == len(records)
    merged = [line["video_id"] for line in _lines(out)]
    assert sorted(merged) == sorted(line["video_id"] for line in _lines(tmp_path / "whole.jsonl"))
    assert len(merged) == len(set(merged))
    # Merging again (or a shard listed twice) keeps each video once.
    summary = merge(
        [shard_output(out, (0, 3)), shard_output(out, (0, 3)), shard_output(out, (1, 3)), shard_output(out, (2, 3))],
        out,
    )
    assert summary["videos"] == len(records) and summary["duplicates"] == len(_lines(shard_output(out, (0, 3))))


def test_shard_argument_and_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from mama.augment.job import parse_shard

    assert parse_shard("1/4") == (1, 4)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert parse_shard(None) == (2, 3)
    with pytest.raises(ValueError, match="under torchrun"):
        parse_shard("1/4")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    for bad in ("4/4", "x/2", "3"):
        with pytest.raises(ValueError, match="I/N"):
            parse_shard(bad)
