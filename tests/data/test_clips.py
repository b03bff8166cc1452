"""Clip sets: videos that fail in the middle of a run are replaced (training) or kept blank (evaluation),
counted once, and never pair a caption with the wrong video."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import Tensor

from mama.data.clips import MAX_SUBSTITUTIONS, ClipSet
from mama.data.records import Caption, VideoRecord

V, POOL, T, S = 12, 3, 2, 4


@dataclass
class FailingFrames:
    """A frame source whose frames encode the video index, failing for the videos in ``bad``."""

    bad: set[int]
    num_slots: int = 4
    calls: list[list[int]] = field(default_factory=list)

    def clips(self, video_index: Tensor, slot_index: Tensor) -> tuple[Tensor, list[tuple[int, str]]]:
        self.calls.append(video_index.tolist())
        out = (
            (video_index + 1)
            .to(torch.uint8)[:, None, None, None, None]
            .expand(-1, slot_index.shape[1], S, S, 3)
            .clone()
        )
        failed = [
            (row, f"/videos/v{v}.mp4: corrupt video") for row, v in enumerate(video_index.tolist()) if v in self.bad
        ]
        for row, _ in failed:
            out[row] = 0
        return out, failed


def _clipset(bad: set[int]) -> ClipSet:
    records = [
        VideoRecord(
            f"v{i}", Path(f"/videos/v{i}.mp4"), [Caption(f"video {i} caption {j}", "human") for j in range(POOL)]
        )
        for i in range(V)
    ]
    # Caption ids encode (video, position in pool) so the pairing can be checked from the batch alone.
    ids = torch.tensor([[100 * i + j] for i in range(V) for j in range(POOL)])
    return ClipSet(
        records=records,
        source=FailingFrames(bad),  # type: ignore[arg-type]
        caption_ids=ids,
        caption_mask=torch.ones_like(ids),
        pool_start=torch.arange(V) * POOL,
        pool_size=torch.full((V,), POOL),
        caption_video=torch.arange(V).repeat_interleave(POOL),
        caption_source=["human"] * V * POOL,
        caption_noise=["none"] * V * POOL,
        caption_text=[r.captions[j].text for r in records for j in range(POOL)],
        skipped=[],
    )


def _check_pairing(batch: dict, clips: ClipSet) -> None:
    videos = batch["video_index"].tolist()
    frames_of = batch["frames"][:, 0, 0, 0, 0].long() - 1  # the video each row's frames came from
    assert frames_of.tolist() == videos
    assert [int(i) // 100 for i in batch["input_ids"][:, 0]] == videos  # each caption belongs to its row's video
    assert clips.caption_video[batch["caption_index"]].tolist() == videos


def test_failed_training_videos_are_replaced_pairwise_and_counted_once() -> None:
    clips = _clipset(bad={3, 4})
    video_index = torch.tensor([3, 4, 5, 9])
    caption_index = clips.pool_start[video_index] + torch.tensor([2, 1, 0, 1])
    with pytest.warns(UserWarning, match="skipping video") as caught:
        batch = clips.batch(video_index, caption_index, torch.zeros(4, T, dtype=torch.long))
    assert sorted(str(w.message) for w in caught) == [f"skipping video /videos/v{i}.mp4: corrupt video" for i in (3, 4)]
    _check_pairing(batch, clips)
    videos = batch["video_index"].tolist()
    assert videos[2:] == [5, 9] and len(set(videos)) == 4, "replacements are good videos not already in the batch"
    assert not {3, 4} & set(videos)
    # The replacement's caption sits at the failed caption's pool position.
    assert [int(i) % 100 for i in batch["input_ids"][:2, 0]] == [2, 1]
    assert set(batch["failed"]) == {3, 4} and len(clips.skipped) == 2

    # Failing again later: not warned or counted twice.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = clips.batch(video_index, caption_index, torch.zeros(4, T, dtype=torch.long))
    assert again["video_index"].tolist() == videos and len(clips.skipped) == 2


def test_failures_from_other_processes_are_counted_once_per_video() -> None:
    clips = _clipset(bad=set())
    clips.note_failures({3: "/videos/v3.mp4: corrupt"})
    clips.note_failures({3: "/videos/v3.mp4: decoding failed after 7 frames", 5: "/videos/v5.mp4: corrupt"})
    assert clips.skipped == ["/videos/v3.mp4: corrupt", "/videos/v5.mp4: corrupt"]


def test_a_long_run_of_broken_videos_does_not_stop_training() -> None:
    broken = set(range(V - 2))  # e.g. one broken folder holding most of the split
    clips = _clipset(bad=broken)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = clips.batch(torch.tensor([0, 1]), torch.tensor([0, 3]), torch.zeros(2, T, dtype=torch.long))
    _check_pairing(batch, clips)
    assert sorted(batch["video_index"].tolist()) == [V - 2, V - 1]


def test_a_split_where_nothing_decodes_fails_with_a_clear_error() -> None:
    clips = _clipset(bad=set(range(V)))
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="failed to decode"):
        warnings.simplefilter("ignore")
        clips.batch(torch.tensor([0]), torch.tensor([0]), torch.zeros(1, T, dtype=torch.long))
    assert MAX_SUBSTITUTIONS > 1


def test_evaluation_keeps_a_failed_video_with_blank_frames() -> None:
    clips = _clipset(bad={1})
    with pytest.warns(UserWarning, match="v1.mp4"):
        batch = clips.eval_video_batch(0, 3, T)
    assert batch["frames"].shape == (3, T, S, S, 3)
    assert batch["frames"][1].eq(0).all() and batch["frames"][0].eq(1).all() and batch["frames"][2].eq(3).all()
    assert list(batch["failed"]) == [1]
