"""Training from WebDataset shards (data.format: webdataset): the folder run's numbers from shards in its
order, every sample once across 2 ranks reading over HTTP, bitwise resume after SIGKILL, damaged samples."""

from __future__ import annotations

import functools
import http.server
import json
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from mama.checkpoint import load_checkpoint
from mama.config import load_config, save_config
from mama.data.clips import seeded_generator
from mama.data.records import read_jsonl
from mama.data.shards import write_shards
from mama.tasks import train
from mama.tasks.retrieval.data import load_data
from test_distributed import _torchrun
from test_train_scaling import kill_training_at

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
Overrides = Callable[[Any, Any], list[str]]


def _write(root: Path, out: Path, order: list[int] | None = None, size_mb: float = 0.05) -> str:
    """Shard root's training split (in ``order``) into ``out``; returns the brace pattern of the shards."""
    records = read_jsonl(root / "train.jsonl")
    if order is not None:
        records = [records[i] for i in order]
    manifest = write_shards(records, out, size_mb, args={"format": "jsonl"}, progress=False)
    counts = [s["samples"] for s in manifest["shards"]]
    assert len(set(counts)) > 1, f"the tests want uneven shards, got {counts}"
    return str(out / f"shard-{{000000..{len(counts) - 1:06d}}}.tar")


def _tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints").tensors["task"]


@pytest.fixture
def http_root() -> Iterator[Callable[[Path], str]]:
    """``serve(folder) -> "http://127.0.0.1:PORT"``: a loopback file server in a thread."""
    servers = []

    def serve(folder: Path) -> str:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()


def test_shards_in_the_folder_order_train_exactly_like_the_folder(
    tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path: Path
) -> None:
    """Shards written in the folder run's epoch-0 order, read without shuffling, give the same batches,
    hence bitwise the same weights and metrics (same decoder, frame indices and captions)."""
    common = ["data.decode=stream", "train.threads=1"]
    folder = train(load_config(None, [*tiny_overrides(tiny_synthvl, tmp_path / "folder"), *common]))
    order = torch.randperm(120, generator=seeded_generator(0, 0, 0)).tolist()  # ClipSet.train_batch, epoch 0
    urls = _write(tiny_synthvl, tmp_path / "shards", order)
    sharded_cfg = [
        *tiny_overrides(tiny_synthvl, tmp_path / "sharded"), *common, "data.format=webdataset",
        f"data.urls={urls}", "data.shuffle_shards=false", "data.shuffle_buffer=0",
    ]  # fmt: skip
    sharded = train(load_config(None, sharded_cfg))

    def losses(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in record.items() if k != "step_ms"} for record in history]

    assert sharded.metrics == folder.metrics and losses(sharded.history) == losses(folder.history)
    a, b = _tensors(tmp_path / "folder"), _tensors(tmp_path / "sharded")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = load_checkpoint(tmp_path / "sharded" / "checkpoints")
    assert ckpt.state["data_position"]["epoch"] == 0 and ckpt.state["data_position"]["samples_per_rank"] == 6 * 16


def test_two_ranks_over_http_see_every_sample_once(
    tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path: Path, http_root: Callable[[Path], str]
) -> None:
    """torchrun with 2 gloo ranks streaming uneven shards from a loopback HTTP server: one epoch (15
    steps of 8) logs every training video exactly once, and both ranks ran every step (each step's log
    line gathers both ranks' rows)."""
    urls = _write(tiny_synthvl, tmp_path / "shards")
    base = http_root(tmp_path / "shards")
    run = tmp_path / "run"
    overrides = [
        *tiny_overrides(tiny_synthvl, run), "data.format=webdataset", f"data.urls={base}/{Path(urls).name}",
        "train.batch_size=8", "train.steps=15", "train.log_weights_every=1", "data.shuffle_buffer=16",
        "train.threads=1", "data.decode=stream",
    ]  # fmt: skip
    save_config(load_config(None, overrides), tmp_path / "run.yaml")
    _torchrun(["-m", "mama.cli", "train", "--config", str(tmp_path / "run.yaml")], tmp_path)
    lines = [json.loads(line) for line in (run / "weights.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 16))
    seen = Counter(video for line in lines for video in line["video_id"])
    assert seen == Counter(r.id for r in read_jsonl(tiny_synthvl / "train.jsonl"))
    assert load_checkpoint(run / "checkpoints").state["data_position"]["world_size"] == 2


def test_killed_shard_run_resumes_to_the_same_weights(
    tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path: Path
) -> None:
    """SIGKILL mid-epoch, --resume from shards (shuffled shards and buffer, read through ``pipe:cat``):
    bitwise the weights of an uninterrupted run, across an epoch boundary."""
    urls = _write(tiny_synthvl, tmp_path / "shards")
    extra = [
        "data.format=webdataset", f"data.urls=pipe:cat {urls}", f"data.manifest={tmp_path / 'shards' / 'manifest.json'}",
        "data.shuffle_buffer=24", "train.steps=12", "train.checkpoint_every=2", "train.threads=1",
    ]  # fmt: skip
    train(load_config(None, [*tiny_overrides(tiny_synthvl, tmp_path / "reference"), *extra]))
    killed = tmp_path / "killed"
    cfg = load_config(None, [*tiny_overrides(tiny_synthvl, killed), *extra])
    save_config(cfg, tmp_path / "killed.yaml")
    assert kill_training_at(tmp_path / "killed.yaml", killed / "checkpoints" / "step_00000004") == -signal.SIGKILL
    resumed = train(cfg, resume=True)
    assert 0 < resumed.steps_run <= 8
    a, b = _tensors(tmp_path / "reference"), _tensors(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_damaged_sample_is_skipped_and_counted(tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path: Path) -> None:
    """A shard member that is not a video: its row gets another video (with a warning), the failure is
    counted like a broken file's, and the batch is full."""
    urls = _write(tiny_synthvl, tmp_path / "shards")
    shard = tmp_path / "shards" / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    start = data.index(b"ftyp") + 64  # inside the first sample's mp4 member: its bytes no longer decode
    data[start : start + 2000] = b"\xff" * 2000
    shard.write_bytes(bytes(data))
    cfg = load_config(None, [*tiny_overrides(tiny_synthvl, tmp_path / "run"), "data.format=webdataset",
                             f"data.urls={urls}", "data.shuffle_shards=false", "data.shuffle_buffer=0"])  # fmt: skip
    train_set = load_data(cfg, ("train",), progress=False).splits["train"]
    with pytest.warns(UserWarning, match=r"skipping video shard-000000.tar/000000000"):
        batch = train_set.train_batch(0, 16, 4, seed=0)
    assert list(batch["failed"]) == [0] and 0 not in batch["video_index"].tolist()
    assert batch["frames"].shape[0] == 16 and len(train_set.skipped) == 1
