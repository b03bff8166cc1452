"""`mama augment --shards`: captioning WebDataset shards with a tiny random LLaVA gives the annotation
file's captions, resumes after an interruption, splits by rank and survives damaged samples and shards."""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest

from mama.augment.captioner import CaptionConfig, LlavaCaptioner
from mama.augment.job import KeyframeConfig, augment, augment_shards, find_shards, merge, shard_output
from mama.cli import main
from mama.data.records import VideoRecord, read_jsonl
from mama.data.shards import write_shards

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
KEYFRAMES = KeyframeConfig(tile_short_side=32)
NUM_VIDEOS = 8


def _cfg(folder: Path, batch_size: int) -> CaptionConfig:
    # A random tiny model writes gibberish: the length and repetition filters would drop most of it.
    return CaptionConfig(
        model=str(folder), min_words=0, max_words=0, repeat_ngram=0, max_new_tokens=8, batch_size=batch_size
    )


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sharded(tiny_synthvl: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[VideoRecord], Path, str]:
    """8 test videos in 4 shards of 2: (records, shard folder, brace pattern)."""
    records = read_jsonl(tiny_synthvl / "test.jsonl")[:NUM_VIDEOS]
    out = tmp_path_factory.mktemp("shards")
    # A sample takes its video plus about 3.5 KiB (three 512-byte headers, the padded txt and json):
    # 1.5 samples per shard closes every shard after its second sample.
    size = max(r.video.stat().st_size for r in records) + 3584
    manifest = write_shards(records, out, shard_size_mb=1.5 * size / 2**20, progress=False)
    assert [s["samples"] for s in manifest["shards"]] == [2, 2, 2, 2]
    return records, out, str(out / "shard-{000000..000003}.tar")


@pytest.fixture(scope="module")
def captioner3(tiny_llava_dir: Path) -> LlavaCaptioner:
    return LlavaCaptioner(_cfg(tiny_llava_dir, 3))  # batches of 3 straddle the shards of 2


@pytest.fixture(scope="module")
def reference(
    sharded: tuple[list[VideoRecord], Path, str], captioner3: LlavaCaptioner, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """An uninterrupted one-process run over the shards (batches of 3)."""
    out = tmp_path_factory.mktemp("reference") / "llava.jsonl"
    summary = augment_shards(sharded[2], out, captioner3.cfg, KEYFRAMES, (0, 1), progress=False, captioner=captioner3)
    assert summary["captioned"] == summary["videos"] == NUM_VIDEOS and summary["shards"] == 4
    return out


@pytest.fixture
def temp_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the job's temporary videos go, to check that none is left behind."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_shards_give_the_annotation_files_captions(
    sharded: tuple[list[VideoRecord], Path, str],
    captioner3: LlavaCaptioner,
    reference: Path,
    tmp_path: Path,
    temp_folder: Path,
) -> None:
    """Same ids, same captions, same order as captioning the files of the annotation records, with
    ``video`` naming the shard member; a re-run has nothing to do; no temporary file is left."""
    records, folder, pattern = sharded
    from_files = tmp_path / "files.jsonl"
    augment(records, from_files, captioner3.cfg, KEYFRAMES, progress=False, captioner=captioner3)
    file_lines, shard_lines = _lines(from_files), _lines(reference)
    assert [line["video_id"] for line in shard_lines] == [r.id for r in records]
    assert [{**line, "video": ""} for line in shard_lines] == [{**line, "video": ""} for line in file_lines]
    members = [f"{folder}/shard-{i // 2:06d}.tar#{i:09d}.mp4" for i in range(NUM_VIDEOS)]
    assert [line["video"] for line in shard_lines] == members

    before = reference.read_bytes()
    summary = augment_shards(pattern, reference, captioner3.cfg, KEYFRAMES, progress=False, captioner=captioner3)
    assert (summary["already_done"], summary["captioned"]) == (NUM_VIDEOS, 0)
    assert reference.read_bytes() == before
    assert not list(temp_folder.iterdir())


def test_interrupted_run_resumes_to_the_uninterrupted_output(
    sharded: tuple[list[VideoRecord], Path, str],
    captioner3: LlavaCaptioner,
    reference: Path,
    tmp_path: Path,
    temp_folder: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C during the second batch (keyframe workers running): the first batch is kept, the temporary
    videos are gone; the re-run captions only the rest and ends with the uninterrupted run's bytes."""
    out = tmp_path / "llava.jsonl"
    real = captioner3.caption
    calls = []

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(captioner3, "caption", interrupted)
    with pytest.raises(KeyboardInterrupt):
        augment_shards(sharded[2], out, captioner3.cfg, KEYFRAMES, workers=1, progress=False, captioner=captioner3)
    assert len(_lines(out)) == 3
    assert not list(temp_folder.iterdir())

    monkeypatch.setattr(captioner3, "caption", real)
    summary = augment_shards(sharded[2], out, captioner3.cfg, KEYFRAMES, progress=False, captioner=captioner3)
    assert (summary["already_done"], summary["captioned"]) == (3, NUM_VIDEOS - 3)
    assert out.read_bytes() == reference.read_bytes()
    with pytest.raises(ValueError, match="other settings.*keyframe"):
        augment_shards(sharded[2], out, captioner3.cfg, KeyframeConfig(tile_short_side=48), progress=False)


def test_two_ranks_cover_every_sample_once_and_merge_to_the_one_process_output(
    sharded: tuple[list[VideoRecord], Path, str], tiny_llava_dir: Path, tmp_path: Path
) -> None:
    """Shard i goes to rank i % 2; the merged rank outputs equal a one-process run line for line (by id;
    batches of 1, so a caption does not depend on which videos share its batch)."""
    records, _, pattern = sharded
    captioner = LlavaCaptioner(_cfg(tiny_llava_dir, 1))
    whole = tmp_path / "whole.jsonl"
    augment_shards(pattern, whole, captioner.cfg, KEYFRAMES, progress=False, captioner=captioner)
    out = tmp_path / "ranks.jsonl"
    for rank in range(2):
        summary = augment_shards(pattern, out, captioner.cfg, KEYFRAMES, (rank, 2), progress=False, captioner=captioner)
        assert summary["shards"] == 2 and summary["captioned"] == NUM_VIDEOS // 2
        # Shards of 2 samples: rank r has shards r and r + 2, i.e. samples 4k + 2r and 4k + 2r + 1.
        ids = [line["video_id"] for line in _lines(shard_output(out, (rank, 2)))]
        assert ids == [r.id for i, r in enumerate(records) if (i // 2) % 2 == rank]
    assert merge(find_shards(out), out)["videos"] == NUM_VIDEOS
    by_id = {line["video_id"]: line for line in _lines(whole)}
    assert {line["video_id"]: line for line in _lines(out)} == by_id


def _rewrite(shard: Path, out: Path, edit: dict[str, bytes]) -> None:
    """Copy a shard, replacing the members named in ``edit`` by their new bytes."""
    with tarfile.open(shard) as src, tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as dst:
        for info in src.getmembers():
            data = edit.get(info.name) or src.extractfile(info).read()  # type: ignore[union-attr]
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))


def test_damaged_samples_and_shards_are_skipped_through_the_cli(
    sharded: tuple[list[VideoRecord], Path, str],
    tiny_llava_dir: Path,
    tmp_path: Path,
    temp_folder: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Undecodable video bytes and a corrupt key.json go to the bad sidecar naming the member; a
    truncated shard and a missing one are warned about and counted; the rest is captioned."""
    records, folder, _ = sharded
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    _rewrite(
        folder / "shard-000000.tar",
        damaged / "shard-000000.tar",
        {"000000000.mp4": b"not a video", "000000001.json": b"{not json"},
    )
    with tarfile.open(folder / "shard-000001.tar") as tar:  # cut inside the second sample's video
        cut = tar.getmember("000000003.mp4").offset_data + 100
    (damaged / "shard-000001.tar").write_bytes((folder / "shard-000001.tar").read_bytes()[:cut])
    urls = "::".join(
        [
            str(damaged / "shard-{000000..000001}.tar"),
            str(folder / "shard-000002.tar"),
            str(damaged / "shard-000009.tar"),  # missing
        ]
    )
    out = tmp_path / "llava.jsonl"
    args = ["augment", "--shards", urls, "--out", str(out), "--model", str(tiny_llava_dir), "--no-progress"]
    args += ["--tile-size", "32", "--max-new-tokens", "8", "--min-words", "0", "--max-words", "0"]
    args += ["--repeat-ngram", "0", "--batch-size", "2"]
    with pytest.warns(UserWarning) as caught:
        assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    messages = "\n".join(str(w.message) for w in caught)
    assert "shard-000001.tar: unreadable tar stream" in messages and "shard-000009.tar" in messages
    assert summary["unreadable_shards"] == 2 and summary["shards"] == 4
    bad = {line["video_id"]: line for line in _lines(out.with_name("llava.bad.jsonl"))}
    first = f"{damaged}/shard-000000.tar"
    assert set(bad) == {records[0].id, "000000001"}  # a sample without its json is known by its key
    assert bad[records[0].id]["video"] == f"{first}#000000000.mp4"
    assert bad[records[0].id]["error"].startswith(f"{first}#000000000.mp4")
    assert "000000001.json is not valid JSON" in bad["000000001"]["error"]
    captioned = [line["video_id"] for line in _lines(out)]
    # The truncated shard's sample before the cut, then shard 2 whole.
    assert captioned == [records[2].id, records[4].id, records[5].id] and summary["captioned"] == 3
    assert summary["bad"] == 2 and not list(temp_folder.iterdir())

    assert main(["augment", str(tmp_path / "x.jsonl"), *args[1:]]) == 2
    assert "give either an annotation file (with --videos) or --shards" in capsys.readouterr().err
