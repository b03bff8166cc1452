"""`mama embed --shards`: an index built from WebDataset shards (mama.data.shards) equals the one built
from the same videos as files, resumes shard by shard, splits shards across torchrun ranks into the
same index, and reports damaged samples and shards without stopping."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch

from mama.cli import main
from mama.config import load_config
from mama.data.records import read_jsonl
from mama.data.shards import write_shards
from mama.inference.embed import Encoder, build_index, build_index_from_shards, load_index
from mama.tasks import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

NUM_VIDEOS = 8


@pytest.fixture(scope="module")
def setup(tiny_synthvl: Path, tiny_overrides: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny exported model (2 training steps), 8 val videos written as 3 shards, and the index of the
    shards built in one process (the reference every other build is compared with)."""
    out = tmp_path_factory.mktemp("embed_shards")
    torch.set_num_threads(1)
    train(load_config(None, [*tiny_overrides(tiny_synthvl, out / "run"), "train.steps=2"]))
    assert main(["export", "--checkpoint", str(out / "run"), "--out", str(out / "model")]) == 0
    records = read_jsonl(tiny_synthvl / "val.jsonl")[:NUM_VIDEOS]
    manifest = write_shards(records, out / "shards", shard_size_mb=0.008, progress=False)
    num_shards = len(manifest["shards"])
    assert num_shards >= 3 and manifest["total_samples"] == NUM_VIDEOS
    pattern = str(out / "shards" / f"shard-{{000000..{num_shards - 1:06d}}}.tar")
    encoder = Encoder.from_pretrained(out / "model")
    build_index_from_shards(encoder, pattern, out / "reference", with_texts=True, progress=False)
    return {"out": out, "model": out / "model", "records": records, "pattern": pattern, "manifest": manifest,
            "encoder": encoder, "reference": out / "reference"}  # fmt: skip


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _shard_urls(setup: dict[str, Any]) -> list[str]:
    return [str(setup["out"] / "shards" / s["name"]) for s in setup["manifest"]["shards"]]


def test_shards_embed_exactly_like_the_files(setup: dict[str, Any], tmp_path: Path) -> None:
    """The same embeddings, ids, captions and caption embeddings as the videos embedded as files (the
    "video" column names the shard member); `mama embed --shards` writes the library's index."""
    records = setup["records"]
    texts = [(r.id, c.text) for r in records for c in r.captions if c.source == "human"]
    # One video a batch on both sides: batches of other shapes can differ in the last float bit, so
    # equal embeddings here mean equal frames.
    files = build_index(
        setup["encoder"], [(r.id, r.video) for r in records], tmp_path / "files", texts, batch_size=1, progress=False
    )
    build_index_from_shards(setup["encoder"], setup["pattern"], tmp_path / "one", batch_size=1, progress=False)
    _, file_emb, file_rows = load_index(tmp_path / "files")
    assert torch.equal(load_index(tmp_path / "one")[1], file_emb) and file_emb.shape[0] == NUM_VIDEOS
    info, emb, rows = load_index(setup["reference"])
    torch.testing.assert_close(emb, file_emb, rtol=0, atol=1e-6)
    assert info["num_failed"] == 0
    assert [r["id"] for r in rows] == [r["id"] for r in file_rows] == [r.id for r in records]
    urls = _shard_urls(setup)
    keys = [(url, key) for url, shard in zip(urls, setup["manifest"]["shards"], strict=True) for key in shard["keys"]]
    assert [r["video"] for r in rows] == [f"{url}#{key}.mp4" for url, key in keys]
    reference = _folder_bytes(setup["reference"])
    assert reference["texts.jsonl"] == _folder_bytes(tmp_path / "files")["texts.jsonl"] and len(texts) > NUM_VIDEOS
    assert reference["texts.safetensors"] == _folder_bytes(tmp_path / "files")["texts.safetensors"]
    assert (
        info["num_texts"] == files["num_texts"]
        and info["num_shards"] == len(urls)
        and info["num_unreadable_shards"] == 0
    )

    argv = ["embed", "--shards", setup["pattern"], "--model", str(setup["model"]), "--out", str(tmp_path / "cli")]
    assert main([*argv, "--texts", "--no-progress"]) == 0
    assert _folder_bytes(tmp_path / "cli") == reference
    assert not (tmp_path / "cli" / "parts").exists()
    assert main([*argv, "--videos", str(tmp_path)]) == 2, "--shards and --videos together are refused"


def test_an_interrupted_run_resumes_without_embedding_a_shard_twice(
    setup: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    embedded: list[str] = []
    first_shard = setup["manifest"]["shards"][0]["samples"]
    kill = {"after": first_shard}
    real = Encoder.encode_samples

    def counting(self: Encoder, samples: Any, *args: Any, **kwargs: Any) -> Any:
        if kill["after"] is not None and len(embedded) >= kill["after"]:
            raise KeyboardInterrupt  # the job is killed after committing its first shard
        embedded.extend(f"{s.url}#{s.key}" for s in samples)
        return real(self, samples, *args, **kwargs)

    monkeypatch.setattr(Encoder, "encode_samples", counting)
    out = tmp_path / "index"
    with pytest.raises(KeyboardInterrupt):
        build_index_from_shards(setup["encoder"], setup["pattern"], out, with_texts=True, progress=False)
    assert not (out / "index.json").exists() and len(embedded) == first_shard
    kill["after"] = None
    build_index_from_shards(setup["encoder"], setup["pattern"], out, with_texts=True, progress=False)
    assert len(embedded) == len(set(embedded)) == NUM_VIDEOS, "every sample embedded exactly once over both runs"
    assert _folder_bytes(out) == _folder_bytes(setup["reference"])


def test_damaged_samples_and_shards_are_reported_not_fatal(setup: dict[str, Any], tmp_path: Path) -> None:
    """A member that does not decode lands in failed.txt; a truncated shard keeps the samples before the
    damage and is counted in the manifest; the job finishes."""
    urls = [str(tmp_path / Path(u).name) for u in _shard_urls(setup)]
    for source, url in zip(_shard_urls(setup), urls, strict=True):
        Path(url).write_bytes(Path(source).read_bytes())
    with tarfile.open(urls[0]) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    bad_key = setup["manifest"]["shards"][0]["keys"][1]
    with tarfile.open(urls[0], "w") as tar:
        for member, data in members:
            data = b"\0garbage" * 10 if member.name == f"{bad_key}.mp4" else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    with tarfile.open(urls[2]) as tar:
        cut = tar.getmembers()[-3].offset_data + 100  # inside the video of the shard's last sample
    Path(urls[2]).write_bytes(Path(urls[2]).read_bytes()[:cut])
    with pytest.warns(UserWarning) as caught:
        info = build_index_from_shards(setup["encoder"], urls, tmp_path / "index", progress=False)
    messages = [str(w.message) for w in caught]
    assert any(f"{urls[0]}#{bad_key}.mp4" in m for m in messages)
    assert any(m.startswith(f"skipping the rest of shard {urls[2]}") for m in messages)
    failed = (tmp_path / "index" / "failed.txt").read_text()
    assert failed.startswith(f"{urls[0]}#{bad_key}.mp4: ") and len(failed.splitlines()) == 1
    assert info["num_unreadable_shards"] == 1 and info["unreadable_shards"][0].startswith(urls[2])
    _, emb, rows = load_index(tmp_path / "index")
    _, reference, reference_rows = load_index(setup["reference"])
    kept = [i for i, row in enumerate(reference_rows) if row["id"] in {r["id"] for r in rows}]
    assert len(rows) == NUM_VIDEOS - 2, "one sample does not decode, the truncated shard loses its last one"
    # Leaving a sample out changes the batches, and a batch's shape can move the last float bit.
    torch.testing.assert_close(emb, reference[kept], rtol=0, atol=1e-6)


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Two gloo processes on CPU, as tests/test_distributed.py launches them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.mark.distributed
def test_two_ranks_build_the_index_of_one_process(setup: dict[str, Any], tmp_path: Path) -> None:
    """Shard i to rank i % 2, each rank its own parts, rank 0 assembles: the one-process index, byte for byte."""
    out = tmp_path / "index"
    argv = ["-m", "mama.cli", "embed", "--shards", setup["pattern"], "--model", str(setup["model"]), "--out", str(out)]
    done = _torchrun([*argv, "--texts"], tmp_path)
    assert _folder_bytes(out) == _folder_bytes(setup["reference"])
    assert "embed shards (rank 1)" in done.stderr, "rank 1 embedded shards of its own"
    assert json.loads(done.stdout[done.stdout.index("{") :])["num_videos"] == NUM_VIDEOS, "rank 0 prints the summary"


def test_append_adds_only_the_samples_the_index_lacks(
    setup: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = _shard_urls(setup)
    out = tmp_path / "index"
    build_index_from_shards(setup["encoder"], urls[:2], out, progress=False)
    embedded: list[str] = []
    real = Encoder.encode_samples

    def counting(self: Encoder, samples: Any, *args: Any, **kwargs: Any) -> Any:
        embedded.extend(s.meta["id"] for s in samples)
        return real(self, samples, *args, **kwargs)

    monkeypatch.setattr(Encoder, "encode_samples", counting)
    info = build_index_from_shards(setup["encoder"], urls, out, progress=False, append=True)
    first_two = sum(s["samples"] for s in setup["manifest"]["shards"][:2])
    assert embedded == [r.id for r in setup["records"][first_two:]], "only the samples the index lacks"
    _, emb, rows = load_index(out)
    _, reference, reference_rows = load_index(setup["reference"])
    assert info["num_videos"] == NUM_VIDEOS and rows == reference_rows and torch.equal(emb, reference)
