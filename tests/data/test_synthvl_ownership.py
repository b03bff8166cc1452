"""SynthVL generation writes only where it may: a new or empty folder, or one it made itself.

Regression tests for issue class 1 (data loss): `mama train` with the default ``data.synthvl`` and
``data.root`` at a user's own dataset rewrote the user's JSONL files and deleted videos it had not made.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from mama.cli import main
from mama.config import DataConfig
from mama.data import synthvl
from mama.data.synthvl import (
    MARKER_NAME,
    METADATA_NAME,
    SPLITS,
    ForeignFolderError,
    SynthConfig,
    ensure_dataset,
    generate,
    is_complete,
    is_synthvl_folder,
)
from mama.data.synthvl_qa import is_current, write_synthvl_qa
from test_reliability import snapshot

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
TINY = SynthConfig(num_train=30, num_meta=30, num_val=30, num_test=30, num_frames=4, size=16)


def _user_dataset(tiny_synthvl: Path, root: Path) -> Path:
    """A user's own dataset in our JSONL layout (no SynthVL marker or metadata), with the user's extra files:
    one video named like SynthVL's stale videos, one other file."""
    shutil.copytree(
        tiny_synthvl, root, ignore=shutil.ignore_patterns(".cache", MARKER_NAME, METADATA_NAME, "qa_*", "count")
    )
    (root / "videos" / "train" / "train_holiday.mp4").write_bytes(os.urandom(300))
    (root / "README.txt").write_text("my dataset\n")
    return root


def test_train_with_default_synthvl_refuses_a_users_dataset_and_changes_nothing(
    tiny_synthvl: Path, tiny_overrides: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _user_dataset(tiny_synthvl, tmp_path / "mine")
    before = snapshot(root)
    # The tiny run's settings, but data.synthvl left at its default (true); a small SynthVL scale keeps the
    # old behaviour (generate over the user's files, then train) quick when this test is run against it.
    overrides = [o for o in tiny_overrides(root, tmp_path / "run") if o != "data.synthvl=false"]
    code = main(["train", "--config", str(CONFIG_DIR / "synthvl_mama.yaml"), *overrides, "data.synthvl_scale=0.01"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(root) in err and "data.synthvl=false" in err and "data.root" in err
    assert "Traceback" not in err
    assert snapshot(root) == before

    with pytest.raises(ForeignFolderError, match="data.synthvl=false"):
        ensure_dataset(DataConfig(root=str(root)), progress=False)
    with pytest.raises(ForeignFolderError, match="neither empty nor a SynthVL folder"):
        generate(root, TINY, progress=False, workers=1, overwrite=True)
    with pytest.raises(ForeignFolderError):
        write_synthvl_qa(root, progress=False)
    assert snapshot(root) == before


def test_synth_command_refuses_a_folder_that_is_not_its_own(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"not": "synthvl"}\n')
    before = snapshot(folder)
    assert main(["synth", "--out", str(folder), "--scale", "0.01", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "train.jsonl" in err and "empty or new" in err
    assert snapshot(folder) == before
    with pytest.raises(ForeignFolderError, match="is a file"):
        generate(folder / "train.jsonl", TINY, progress=False)


def test_generation_says_what_it_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synth"
    generate(out, TINY, progress=True, workers=1)
    assert f"SynthVL: generating into {out} (a new folder)" in capsys.readouterr().err
    generate(out, TINY, progress=True, workers=1)
    assert f"SynthVL: reusing the complete dataset at {out}" in capsys.readouterr().err


def test_interrupted_generation_is_recognised_and_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    reference = generate(tmp_path / "reference", TINY, progress=False, workers=1)
    out = tmp_path / "empty"
    out.mkdir()  # an empty folder is fine to generate into
    render = synthvl._render_and_write
    calls = {"n": 0}

    def render_then_die(task: Any) -> str:
        calls["n"] += 1
        if calls["n"] > 10:
            raise KeyboardInterrupt  # killed mid-way through the videos
        return render(task)

    monkeypatch.setattr(synthvl, "_render_and_write", render_then_die)
    with pytest.raises(KeyboardInterrupt):
        generate(out, TINY, progress=False, workers=1)
    monkeypatch.setattr(synthvl, "_render_and_write", render)
    assert not is_complete(out, TINY) and not (out / METADATA_NAME).exists()
    assert is_synthvl_folder(out), "the marker is written before any video"
    (out / "notes.txt").write_text("a user's note dropped into the folder")

    generate(out, TINY, progress=True, workers=1)
    assert "its own folder" in capsys.readouterr().err
    assert is_complete(out, TINY)
    for split in SPLITS:
        assert (out / f"{split}.jsonl").read_bytes() == (reference / f"{split}.jsonl").read_bytes()
        assert sorted(p.name for p in (out / "videos" / split).iterdir()) == sorted(
            p.name for p in (reference / "videos" / split).iterdir()
        )
    assert (out / "notes.txt").read_text() == "a user's note dropped into the folder"


def test_regenerating_its_own_folder_deletes_only_its_own_stale_videos(tmp_path: Path) -> None:
    out = generate(tmp_path / "synth", SynthConfig(**{**TINY.__dict__, "num_train": 60}), progress=False, workers=1)
    mine = {
        out / "notes.txt": b"notes",
        out / "videos" / "train" / "train_holiday.mp4": os.urandom(100),  # named like ours, but not an id
        out / "videos" / "train" / "my_clip.mp4": os.urandom(100),
    }
    for path, data in mine.items():
        path.write_bytes(data)
    assert (out / "videos" / "train" / "train_00059.mp4").exists()

    generate(out, TINY, progress=False, workers=1)  # 30 training videos now: 30 of ours are stale
    assert is_complete(out, TINY)
    ids = {f"{r['id']}.mp4" for r in map(json.loads, (out / "train.jsonl").read_text().splitlines())}
    assert {p.name for p in (out / "videos" / "train").glob("train_0*.mp4")} == ids
    assert all(path.read_bytes() == data for path, data in mine.items())


def test_folders_made_before_the_marker_are_still_recognised(tiny_synthvl: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(tiny_synthvl, old, ignore=shutil.ignore_patterns(".cache", MARKER_NAME))
    assert is_synthvl_folder(old)
    config = SynthConfig(**json.loads((old / METADATA_NAME).read_text())["config"])
    before = snapshot(old)
    generate(old, config, progress=False)  # complete: reused as it is
    assert snapshot(old) == before


def test_qa_files_follow_the_synthvl_they_were_made_for(tmp_path: Path) -> None:
    out = generate(tmp_path / "synth", TINY, progress=False, workers=1)
    write_synthvl_qa(out, progress=False)
    assert is_current(out)
    (out / "videos" / "count" / "holiday.mp4").write_bytes(b"user")
    generate(out, SynthConfig(**{**TINY.__dict__, "seed": 1}), progress=False, workers=1)
    assert not is_current(out), "QA files of the old SynthVL must be rewritten"
    write_synthvl_qa(out, progress=False)
    assert is_current(out) and (out / "videos" / "count" / "holiday.mp4").read_bytes() == b"user"
