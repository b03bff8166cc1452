"""The safetensors frame cache is shared safely: written with the usual permissions, and a cache file that
cannot be read (another user's, damaged) is a miss with a warning, never an error.

Regression tests for issue class 7 (shared folders).
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mama.data.clips import load_frames
from mama.data.records import VideoRecord, read_jsonl


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def records(tiny_synthvl: Path) -> list[VideoRecord]:
    return read_jsonl(tiny_synthvl / "test.jsonl")[:4]


def _load(cache_dir: Path, records: list[VideoRecord]) -> tuple[list[int], torch.Tensor, list[str]]:
    return load_frames(cache_dir, "test", records, frame_size=16, cached_frames=4, progress=False)


def test_cache_files_are_readable_by_group_and_others(
    records: list[VideoRecord], tmp_path: Path, umask_022: None
) -> None:
    _load(tmp_path / ".cache", records)
    (cache,) = (tmp_path / ".cache").iterdir()
    assert stat.S_IMODE(cache.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / ".cache").stat().st_mode) == 0o755


def test_a_damaged_cache_file_is_a_miss_with_a_warning(records: list[VideoRecord], tmp_path: Path) -> None:
    kept, frames, _ = _load(tmp_path, records)
    (cache,) = tmp_path.iterdir()
    cache.write_bytes(b"\x00" * 40)
    with pytest.warns(UserWarning, match="ignoring unreadable frame cache"):
        again = _load(tmp_path, records)
    assert again[0] == kept and torch.equal(again[1], frames)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rewritten: read back without a word
        assert torch.equal(_load(tmp_path, records)[1], frames)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_another_users_unreadable_cache_in_a_read_only_folder_costs_only_the_cache(
    records: list[VideoRecord], tmp_path: Path
) -> None:
    kept, frames, _ = _load(tmp_path, records)
    (cache,) = tmp_path.iterdir()
    cache.chmod(0o000)  # a teammate's cache written owner-only, in a folder we may not write
    tmp_path.chmod(0o555)
    try:
        with pytest.warns(UserWarning) as caught:
            again = _load(tmp_path, records)
    finally:
        tmp_path.chmod(0o755)
        cache.chmod(0o644)
    messages = [str(w.message) for w in caught]
    assert any("ignoring unreadable frame cache" in m and "Permission denied" in m for m in messages), messages
    assert any("cannot write the frame cache" in m for m in messages), messages
    assert again[0] == kept and torch.equal(again[1], frames)


def test_decoding_in_several_processes_gives_the_same_frames_and_skips(
    tiny_synthvl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mama.data.clips as clips

    records = read_jsonl(tiny_synthvl / "test.jsonl")[:12]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00not a video")
    records[5] = VideoRecord(id="broken", video=broken, captions=records[5].captions)
    with pytest.warns(UserWarning, match="skipping video .*broken.mp4"):
        one = _load(tmp_path / "one", records)
    monkeypatch.setattr(clips, "_POOL_MIN_VIDEOS", 2)
    assert clips.decode_processes(len(records)) > 1 or (os.cpu_count() or 1) == 1
    with pytest.warns(UserWarning, match="skipping video .*broken.mp4"):
        many = _load(tmp_path / "many", records)
    assert many[0] == one[0] == [i for i in range(12) if i != 5]
    assert torch.equal(many[1], one[1]) and many[2] == one[2] and len(one[2]) == 1
