"""WebDataset shards (mama.data.shards): layout, resumable writing, reading back by URL, the epoch plan."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

import mama.data.shards as shards
from mama.cli import main
from mama.data.clips import StreamedFrames
from mama.data.records import read_jsonl
from mama.data.shards import (
    ShardError,
    ShardFrames,
    ShardPlan,
    decode_sample_clip,
    iter_shard_samples,
    iter_tar_samples,
    shard_dataset,
    write_shards,
)
from mama.data.video import probe_video
from mama.fileio import sha256_file

pytestmark = pytest.mark.usefixtures("one_thread")


def _pattern(out: Path, manifest: dict) -> str:
    return str(out / f"shard-{{000000..{len(manifest['shards']) - 1:06d}}}.tar")


def test_layout_manifest_and_reading_back(tiny_synthvl: Path, tmp_path: Path) -> None:
    """video2dataset's layout (key.mp4 bytes as stored, key.txt, key.json with the caption pool), a manifest
    whose counts, sizes and sha256 match the files, and every sample read back once over the shards."""
    out = tmp_path / "shards"
    assert (
        main(["shard", str(tiny_synthvl / "val.jsonl"), "--out", str(out), "--shard-size-mb", "0.03", "--no-progress"])
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    records = read_jsonl(tiny_synthvl / "val.jsonl")
    assert manifest["total_samples"] == len(records) == 30 and len(manifest["shards"]) > 2
    for shard in manifest["shards"]:
        path = out / shard["name"]
        assert path.stat().st_size == shard["bytes"] and sha256_file(path) == shard["sha256"]
        with tarfile.open(path) as tar:
            assert len(tar.getnames()) == 3 * shard["samples"]
    with tarfile.open(out / "shard-000000.tar") as tar:
        names = tar.getnames()
        assert names[:3] == ["000000000.mp4", "000000000.txt", "000000000.json"]
        pool = json.loads(tar.extractfile(names[2]).read())  # type: ignore[union-attr]
        assert tar.extractfile(names[0]).read() == records[0].video.read_bytes()  # type: ignore[union-attr]
        assert tar.extractfile(names[1]).read().decode() == records[0].captions[0].text  # type: ignore[union-attr]
    assert pool["id"] == records[0].id and pool["captions"] == [c.to_dict() for c in records[0].captions]
    assert pool["meta"] == records[0].meta

    # Split by rank: disjoint, together every sample once; a pipe: URL reads the same bytes.
    urls = _pattern(out, manifest)
    seen = [[s.meta["id"] for s in iter_shard_samples(urls, rank=r, world_size=2)] for r in range(2)]
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == sorted(r.id for r in records)
    piped = list(iter_tar_samples(f"pipe:cat {out / 'shard-000001.tar'}"))
    local = list(iter_tar_samples(str(out / "shard-000001.tar")))
    assert [s.video for s in piped] == [s.video for s in local] and len(local) == manifest["shards"][1]["samples"]
    with pytest.raises(ShardError, match="shard-000099.tar"):
        list(iter_tar_samples(str(out / "shard-000099.tar")))


def test_sample_decodes_to_the_folder_paths_frames(tiny_synthvl: Path, tmp_path: Path) -> None:
    """The frames decoded from a shard sample's bytes are those StreamedFrames decodes from the file."""
    record = read_jsonl(tiny_synthvl / "val.jsonl")[3]
    write_shards([record], tmp_path, progress=False)
    sample = next(iter_tar_samples(str(tmp_path / "shard-000000.tar")))
    slots = torch.tensor([0, 3, 5, 7])
    frames, count = decode_sample_clip(sample, 8, slots, 16)
    streamed = StreamedFrames([record.video], [probe_video(record.video).num_frames], 8, 16)
    expected, failed = streamed.clips(torch.tensor([0]), slots[None])
    assert not failed and count == probe_video(record.video).num_frames
    assert torch.equal(frames, expected[0]) and frames.shape == (4, 16, 16, 3)
    broken = shards.ShardSample(sample.key, b"not a video", {}, "x.tar")
    with pytest.raises(shards.VideoDecodeError, match="x.tar/000000000.mp4"):
        decode_sample_clip(broken, 8, slots, 16)


def test_interrupted_shard_run_resumes_keeping_finished_shards(
    tiny_synthvl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run stopped mid-way keeps its verified shards untouched on re-run and ends byte-identical to an
    uninterrupted run; a shard damaged in between is rewritten; other arguments are refused."""
    records = read_jsonl(tiny_synthvl / "val.jsonl")
    clean = write_shards(records, tmp_path / "clean", 0.03, args={"format": "jsonl"}, progress=False)
    real = shards._video_bytes
    calls = {"n": 0}

    def crash_at_20(record, short_side):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt  # the user's Ctrl-C, mid-shard
        return real(record, short_side)

    out = tmp_path / "resumed"
    monkeypatch.setattr(shards, "_video_bytes", crash_at_20)
    with pytest.raises(KeyboardInterrupt):
        write_shards(records, out, 0.03, args={"format": "jsonl"}, progress=False)
    monkeypatch.setattr(shards, "_video_bytes", real)
    done = json.loads((out / ".shard_progress.json").read_text())["shards"]
    assert 1 < len(done) < len(clean["shards"]) and not (out / "manifest.json").exists()
    stamps = {s["name"]: (out / s["name"]).stat().st_mtime_ns for s in done}
    assert not list(out.glob("*.tmp*")), "an interrupted shard must not be left half-written"

    calls["n"] = 0

    def counting(record, short_side):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return real(record, short_side)

    monkeypatch.setattr(shards, "_video_bytes", counting)
    resumed = write_shards(records, out, 0.03, args={"format": "jsonl"}, progress=False)
    assert calls["n"] == len(records) - done[-1]["stop"], "finished shards were read again"
    assert {n: (out / n).stat().st_mtime_ns for n in stamps} == stamps
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in clean["shards"]]
    assert (out / "index.jsonl").read_bytes() == (tmp_path / "clean" / "index.jsonl").read_bytes()

    (out / "shard-000001.tar").write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="shard-000001.tar: missing or changed"):
        again = write_shards(records, out, 0.03, args={"format": "jsonl"}, progress=False)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in clean["shards"]]
    with pytest.raises(ShardError, match="different arguments.*shard_size_mb"):
        write_shards(records, out, 0.05, args={"format": "jsonl"}, progress=False)
    # The CLI reports it as a one-line error.
    assert (
        main(["shard", str(tiny_synthvl / "val.jsonl"), "--out", str(out), "--shard-size-mb", "1", "--no-progress"])
        == 2
    )


def test_shard_a_plain_folder_and_reencode(tiny_synthvl: Path, tmp_path: Path) -> None:
    """A folder of videos (no annotations) shards with ids from the file names; --short-side re-encodes."""
    manifest = shard_dataset("folder", tiny_synthvl / "videos" / "val", tmp_path, short_side=16, progress=False)
    assert manifest["total_samples"] == 30 and manifest["args"]["short_side"] == 16
    sample = next(iter_tar_samples(str(tmp_path / "shard-000000.tar")))
    with shards._as_file(sample.video, "mp4") as path:
        info = probe_video(path)
    assert min(info.height, info.width) == 16 and sample.meta["captions"] == []


@pytest.mark.parametrize("world", [1, 2, 3])
def test_plan_sees_every_sample_once_with_equal_steps_on_uneven_shards(world: int) -> None:
    counts = [7, 3, 12, 1, 9, 5]  # uneven shards: 37 samples
    start = [sum(counts[:i]) for i in range(len(counts))]
    plan = ShardPlan([list(range(s, s + c)) for s, c in zip(start, counts, strict=True)], 6, world, seed=3,
                     shuffle_buffer=8)  # fmt: skip
    assert plan.steps_per_epoch == 37 // 6
    for epoch in (0, 1):
        per_rank = [plan.rank_order(epoch, r) for r in range(world)]
        assert {len(o) for o in per_rank} == {plan.steps_per_epoch * 6 // world}  # every rank: the same steps
        flat = [v for o in per_rank for v in o]
        assert len(set(flat)) == len(flat) == 36  # once each; the last 37 % 6 = 1 dropped
        order = plan(epoch)
        local = 6 // world
        for r in range(world):  # rank r's rows of global batch p are its p-th local batch
            rows = order.view(-1, world, local)[:, r].reshape(-1).tolist()
            assert rows == per_rank[r]
    assert plan.rank_order(0, 0) != plan.rank_order(1, 0)  # reshuffled per epoch
    fixed = ShardPlan([list(range(s, s + c)) for s, c in zip(start, counts, strict=True)], 6, 1, 0, False, 0)
    assert fixed(0).tolist() == list(range(36))


def test_shard_frames_fetches_out_of_order_and_reports_damage(tiny_synthvl: Path, tmp_path: Path) -> None:
    records = read_jsonl(tiny_synthvl / "val.jsonl")[:6]
    write_shards(records, tmp_path, 0.03, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    locations = []
    for shard in manifest["shards"]:
        locations += [(str(tmp_path / shard["name"]), i, key) for i, key in enumerate(shard["keys"])]
    source = ShardFrames(locations, 8, 16)
    order = [5, 0, 3, 3, 1]
    frames, failed = source.clips(torch.tensor(order), torch.zeros(len(order), 2, dtype=torch.long))
    assert not failed and torch.equal(frames[2], frames[3])
    assert [source.fetch(v).meta["id"] for v in (2, 4)] == [records[2].id, records[4].id]

    # Replace one video member by garbage: that row fails, naming the member; the others decode.
    path = Path(locations[1][0])
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            data = b"\0garbage" * 10 if info.name == f"{locations[1][2]}.mp4" else data
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    fresh = ShardFrames(locations, 8, 16)
    _, failed = fresh.clips(torch.tensor([0, 1, 2]), torch.zeros(3, 2, dtype=torch.long))
    assert [row for row, _ in failed] == [1] and f"{locations[1][2]}.mp4" in failed[0][1]


@pytest.mark.parametrize(("world", "workers", "start"), [(1, 1, 0), (2, 3, 0), (1, 2, 5)])
def test_shard_frames_read_each_member_once_per_epoch_holding_at_most_buffer_plus_batch(
    monkeypatch: pytest.MonkeyPatch, world: int, workers: int, start: int
) -> None:
    """Over two epochs of shuffled uneven shards with a shuffle buffer, every process (the loop's, or
    each of ``workers`` data workers building every W-th step, from step ``start`` as a resumed run does)
    reads each tar member at most once per epoch and holds at most shuffle_buffer + local batch samples
    (the buffer's output i comes from inputs up to i + buffer - 1). It gets the samples it asked for, and
    a substitute request (any video) is served right without disturbing the epoch's read."""
    counts, batch, buffer = [37, 12, 50, 25, 41, 9, 30], 16, 40  # 204 samples: 12 steps of 16
    start_of = [sum(counts[:i]) for i in range(len(counts))]
    locations = [(f"fake://shard-{s}", i, f"{s}-{i}") for s, c in enumerate(counts) for i in range(c)]
    plan = ShardPlan([list(range(a, a + c)) for a, c in zip(start_of, counts, strict=True)], batch, world, seed=1,
                     shuffle_buffer=buffer)  # fmt: skip
    reads: dict[tuple[int, int, str], int] = {}  # (process, epoch, member key) -> times read
    now = {"process": 0, "epoch": 0}
    served: list[str] = []

    def fake_tar(url: str):  # type: ignore[no-untyped-def]
        shard = int(url.rsplit("-", 1)[1])
        for i in range(counts[shard]):
            where = (now["process"], now["epoch"], f"{shard}-{i}")
            reads[where] = reads.get(where, 0) + 1
            yield shards.ShardSample(f"{shard}-{i}", b"", {}, url)

    def fake_decode(sample, num_slots, slots, frame_size, num_frames=None):  # type: ignore[no-untyped-def]
        served.append(sample.key)
        return torch.zeros(len(slots), frame_size, frame_size, 3, dtype=torch.uint8), 8

    monkeypatch.setattr(shards, "iter_tar_samples", fake_tar)
    monkeypatch.setattr(shards, "decode_sample_clip", fake_decode)
    monkeypatch.setattr(shards, "_worker_stride", lambda: workers)
    local, steps = batch // world, plan.steps_per_epoch
    for rank in range(world):
        processes = [ShardFrames(locations, 8, 2, plan=plan) for _ in range(workers)]
        for step in range(start, 2 * steps):
            worker = (step - start) % workers
            now["process"], (now["epoch"], position) = worker + workers * rank, divmod(step, steps)
            order = plan(now["epoch"])
            videos = order[position * batch + rank * local : position * batch + (rank + 1) * local]
            served.clear()
            _, failed = processes[worker].clips(videos, torch.zeros(local, 2, dtype=torch.long))
            assert not failed and served == [locations[v][2] for v in videos.tolist()]
            if step == start + 2 * workers:  # a substitute: read from its shard, nothing else held or moved
                now["process"] = -1
                before = processes[worker].members_read
                assert processes[worker].fetch(7).key == locations[7][2]
                assert processes[worker].members_read - before <= counts[0]
        assert all(p.held_peak <= buffer + local for p in processes), [p.held_peak for p in processes]
    assert max(n for (process, _, _), n in reads.items() if process >= 0) == 1
