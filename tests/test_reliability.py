"""Nothing outside a run folder, an output folder named on the command line, or a folder the project created
itself is modified or deleted: sentinel files around every place generation, training, export, embedding
and augmentation write, checked byte for byte (and mode for mode) afterwards."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest

from mama.cli import main
from mama.config import DataConfig, load_config
from mama.data.records import read_jsonl
from mama.data.synthvl import MARKER_NAME, METADATA_NAME, ForeignFolderError, SynthConfig, ensure_dataset, generate
from mama.data.synthvl_qa import write_synthvl_qa
from mama.tasks import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every entry under ``root``, itself included: relative path -> (sha256, "dir" or link target; st_mode)."""
    entries = {}
    for path in [root, *root.rglob("*")]:
        info = path.lstat()
        if stat.S_ISDIR(info.st_mode):
            content = "dir"
        elif stat.S_ISLNK(info.st_mode):
            content = f"link:{os.readlink(path)}"
        else:
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        entries[path.relative_to(root).as_posix()] = (content, info.st_mode)
    return entries


def _plant(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sentinel.bin").write_bytes(os.urandom(64))


def test_sentinels_survive_generation_training_export_embedding_and_augmentation(
    tiny_synthvl: Path, tiny_overrides: Any, tiny_llava_dir: Path, tmp_path: Path
) -> None:
    data, runs, out = tmp_path / "data", tmp_path / "runs", tmp_path / "out"
    user = data / "user"  # a user's own dataset in our JSONL layout
    shutil.copytree(tiny_synthvl, user, ignore=shutil.ignore_patterns(".cache", MARKER_NAME, METADATA_NAME))
    for folder in (tmp_path, data, user, user / "videos" / "test", runs, runs / "old_run", out):
        _plant(folder)
    few = [r.to_dict() for r in read_jsonl(user / "test.jsonl")[:2]]  # absolute video paths
    (out / "few.jsonl").write_text("".join(json.dumps(r) + "\n" for r in few))
    before = snapshot(tmp_path)
    fixtures = {folder: snapshot(folder) for folder in (tiny_synthvl, tiny_llava_dir)}

    # Generation: into a new folder (allowed), never over the user's dataset.
    tiny = SynthConfig(num_train=30, num_meta=30, num_val=30, num_test=30, num_frames=4, size=16)
    write_synthvl_qa(generate(data / "synth", tiny, progress=False, workers=1), progress=False)
    with pytest.raises(ForeignFolderError):
        ensure_dataset(DataConfig(root=str(user), synthvl_scale=0.01), progress=False)

    # A tiny training run on the user's dataset, its export, an index of the user's test split, LLaVA captions.
    train(load_config(None, tiny_overrides(user, runs / "run")))
    assert main(["export", "--checkpoint", str(runs / "run"), "--out", str(out / "model")]) == 0
    embed = ["embed", "--model", str(out / "model"), "--annotations", str(user / "test.jsonl")]
    assert main([*embed, "--out", str(out / "index"), "--no-progress"]) == 0
    caption = ["--model", str(tiny_llava_dir), "--min-words", "0", "--max-words", "0", "--repeat-ngram", "0"]
    caption += ["--tile-size", "32", "--max-new-tokens", "4", "--num-captions", "1", "--no-progress"]
    assert main(["augment", str(out / "few.jsonl"), "--out", str(out / "llava.jsonl"), *caption]) == 0

    after = snapshot(tmp_path)
    changed = sorted(path for path, entry in before.items() if after.get(path) != entry)
    assert changed == [], f"modified or deleted outside the run and output folders: {changed}"
    # New entries only where the commands were told to write, in the folder generation made, and in the
    # frame cache (mama.data.clips keeps it in the dataset's own .cache folder).
    allowed = ("data/synth", "runs/run", "out/model", "out/index", "out/llava", "data/user/.cache")
    added = sorted(path for path in after.keys() - before.keys() if not path.startswith(allowed))
    assert added == [], f"written outside the run and output folders: {added}"
    assert (out / "llava.jsonl").is_file() and (out / "index").is_dir() and (data / "synth" / METADATA_NAME).is_file()
    for folder, entries in fixtures.items():
        assert snapshot(folder) == entries, f"{folder} changed"
