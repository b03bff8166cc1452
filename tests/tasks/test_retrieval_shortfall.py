"""A test set that shrinks is loud: loading the evaluation splits warns how many videos are missing, next to
the count the annotation file lists (and the benchmark protocol's count where the format fixes one)."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mama.config import load_config
from mama.tasks.retrieval.data import load_data

Overrides = Callable[[Any, Any], list[str]]


def test_missing_test_videos_are_counted_against_the_annotation(
    tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_synthvl, root, ignore=shutil.ignore_patterns(".cache"))
    for name in ("test_00003.mp4", "test_00017.mp4"):
        (root / "videos" / "test" / name).unlink()
    cfg = load_config(None, tiny_overrides(root, tmp_path / "run"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_data(cfg, splits=("train", "val", "test"), progress=False)
    messages = [str(w.message) for w in caught]
    assert len(data.splits["test"]) == 28
    expected = (
        f"test: evaluating on 28 of the 30 videos listed in {root / 'test.jsonl'} (2 missing or unreadable, skipped)"
    )
    assert expected in messages
    assert not any(m.startswith("val: evaluating") for m in messages)  # nothing missing there: no warning
