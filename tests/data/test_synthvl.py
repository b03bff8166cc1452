"""Tests for mama.data.synthvl: the synthetic benchmark's splits, captions and videos."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mama.data.records import read_jsonl
from mama.data.synthvl import (
    BACKGROUNDS,
    COLOURS,
    CONCEPTS,
    SPLITS,
    SynthConfig,
    _sample_start,
    concept_table,
    generate,
    is_complete,
    make_records,
    parse_caption,
)
from mama.data.video import decode_frames

SMALL = SynthConfig(num_train=60, num_meta=30, num_val=60, num_test=70, num_frames=8, size=32)
ATTRIBUTES = ("shape", "colour", "size", "motion", "background")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("synthvl"), SMALL, progress=False, workers=2)


@pytest.fixture(scope="module")
def default_records() -> dict[str, list[dict]]:
    # captions and splits at full size, no rendering: enough samples for rate checks
    return make_records(SynthConfig())


def test_same_seed_gives_identical_files(dataset: Path, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", SMALL, progress=False, workers=1)  # other worker count too
    for split in SPLITS:
        assert (again / f"{split}.jsonl").read_bytes() == (dataset / f"{split}.jsonl").read_bytes()
    for split in SPLITS:
        for record in read_jsonl(dataset / f"{split}.jsonl"):
            assert (again / "videos" / split / record.video.name).read_bytes() == record.video.read_bytes()
    assert (again / "synthvl.json").read_bytes() == (dataset / "synthvl.json").read_bytes()


def test_other_seed_gives_other_data() -> None:
    base = make_records(SMALL)
    other = make_records(SynthConfig(**{**SMALL.__dict__, "seed": 1}))
    assert base["train"] != other["train"]
    assert base["test"] != other["test"]


def test_split_sizes_and_files(dataset: Path) -> None:
    expected = {"train": 60, "meta": 30, "val": 60, "test": 60}  # 70 rounds to 60 = 2 per concept
    for split, n in expected.items():
        records = read_jsonl(dataset / f"{split}.jsonl")
        assert len(records) == n
        assert [r.id for r in records] == [f"{split}_{i:05d}" for i in range(n)]
        assert all(r.video.is_file() and r.video.parent == dataset / "videos" / split for r in records)
    assert is_complete(dataset, SMALL)


def test_balanced_splits_and_unique_eval_combinations(default_records: dict[str, list[dict]]) -> None:
    for split, per_concept in (("meta", 5), ("val", 10), ("test", 10)):
        records = default_records[split]
        counts = Counter(r["concept"] for r in records)
        assert len(counts) == len(CONCEPTS) and set(counts.values()) == {per_concept}
        assert all(c["source"] == "human" and c["noise"] == "none" for r in records for c in r["captions"])
    for split in ("val", "test"):
        combos = [tuple(r["attributes"][a] for a in ATTRIBUTES) for r in default_records[split]]
        assert len(set(combos)) == len(combos)
        assert all(len(r["captions"]) == 2 for r in default_records[split])


def test_train_is_long_tailed_with_buckets(default_records: dict[str, list[dict]]) -> None:
    table = concept_table(SynthConfig())
    counts = [row["train_count"] for row in table]
    assert sum(counts) == 2000
    assert counts == sorted(counts, reverse=True)
    assert counts[0] > 10 * counts[-1] and counts[-1] >= 1
    assert Counter(row["bucket"] for row in table) == {"head": 10, "mid": 10, "tail": 10}
    # the seeded permutation spreads colours and shapes over head and tail
    assert len({row["colour"] for row in table if row["bucket"] == "head"}) >= 3
    assert len({row["colour"] for row in table if row["bucket"] == "tail"}) >= 3

    train = default_records["train"]
    observed = Counter(r["concept"] for r in train)
    assert observed == {row["concept"]: row["train_count"] for row in table}
    bucket_of = {row["concept"]: row["bucket"] for row in table}
    assert all(r["bucket"] == bucket_of[r["concept"]] for split in SPLITS for r in default_records[split])


def test_small_train_covers_every_concept() -> None:
    assert all(row["train_count"] >= 1 for row in concept_table(SMALL))


def test_caption_noise_matches_its_label(default_records: dict[str, list[dict]]) -> None:
    noise_counts: Counter[str] = Counter()
    for split in SPLITS:
        for record in default_records[split]:
            truth = record["attributes"]
            sources = [c["source"] for c in record["captions"]]
            if split == "train":
                assert sources == ["human", "lvlm", "lvlm"]
            for caption in record["captions"]:
                parsed = parse_caption(caption["text"])
                if caption["noise"] == "none":
                    assert parsed == truth, caption["text"]
                elif caption["noise"] == "hallucinated":
                    wrong = [a for a in ATTRIBUTES if parsed[a] != truth[a]]
                    assert len(wrong) == 1 and wrong[0] != "background", caption["text"]
                else:
                    assert caption["noise"] == "vague" and caption["source"] == "lvlm"
                    assert not any(colour in caption["text"].lower() for colour in COLOURS)
                    assert all(v is None for v in parsed.values()), caption["text"]
                if caption["source"] == "lvlm":
                    noise_counts[caption["noise"]] += 1
    total = sum(noise_counts.values())
    assert total == 4000
    assert abs(noise_counts["hallucinated"] / total - 0.3) < 0.03
    assert abs(noise_counts["vague"] / total - 0.2) < 0.03


def test_is_complete_and_idempotence(dataset: Path, tmp_path: Path) -> None:
    assert not is_complete(dataset, SynthConfig(**{**SMALL.__dict__, "seed": 7}))
    assert not is_complete(tmp_path, SMALL)
    stamp = (dataset / "train.jsonl").stat().st_mtime_ns
    generate(dataset, SMALL, progress=False, workers=1)  # complete already: nothing rewritten
    assert (dataset / "train.jsonl").stat().st_mtime_ns == stamp


def _object_mask(frames: np.ndarray, background: str) -> np.ndarray:
    """(T, H, W) bool: pixels far from the background colour."""
    distance = np.linalg.norm(frames.astype(np.float64) - np.array(BACKGROUNDS[background]), axis=-1)
    return distance > 80


def test_decoded_videos_show_colour_and_motion(dataset: Path) -> None:
    records = read_jsonl(dataset / "test.jsonl")
    seen_motions = set()
    for record in records[:24]:
        attrs = record.meta["attributes"]
        frames = decode_frames(record.video).numpy()
        assert frames.shape == (SMALL.num_frames, SMALL.size, SMALL.size, 3)
        mask = _object_mask(frames, attrs["background"])
        assert mask.sum(axis=(1, 2)).min() > 3, record.id  # the object is visible in every frame

        # colour: erode by requiring all 4 neighbours inside, to skip chroma-blurred edges
        core = mask.copy()
        core[:, 1:-1, 1:-1] &= mask[:, :-2, 1:-1] & mask[:, 2:, 1:-1] & mask[:, 1:-1, :-2] & mask[:, 1:-1, 2:]
        inside = frames[core].astype(np.float64).mean(axis=0)
        outside = frames[~mask].astype(np.float64).mean(axis=0)
        assert np.abs(inside - COLOURS[attrs["colour"]]).max() < 40, (record.id, inside)
        assert np.abs(outside - BACKGROUNDS[attrs["background"]]).max() < 25, (record.id, outside)

        # motion: the centroid travels about half the frame in the labelled direction
        ys, xs = np.mgrid[0 : SMALL.size, 0 : SMALL.size]
        centroid = np.stack(
            [[(xs * m).sum() / m.sum(), (ys * m).sum() / m.sum()] for m in mask.astype(np.float64)]
        )  # (T, 2) as (x, y)
        dx, dy = centroid[-1] - centroid[0]
        expected = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[attrs["motion"]]
        travel = 0.5 * SMALL.size
        assert abs(dx - expected[0] * travel) < 0.25 * travel, (record.id, dx, dy)
        assert abs(dy - expected[1] * travel) < 0.25 * travel, (record.id, dx, dy)
        steps = np.diff(centroid, axis=0) @ np.array(expected, dtype=np.float64)
        assert (steps > 0).all(), record.id  # steady, not just net displacement
        seen_motions.add(attrs["motion"])
    assert seen_motions == {"left", "right", "up", "down"}


def test_single_frame_position_does_not_reveal_direction() -> None:
    # Pooled over the clip's frames, positions of opposite directions have the same distribution.
    rng = np.random.default_rng(0)
    frame_size, num_frames, n = 64, 16, 4000
    travel_per_frame = 0.5 * frame_size / (num_frames - 1)
    pooled = {}
    for motion, sign in (("left", -1), ("right", 1)):
        starts = np.array([_sample_start(rng, "large", motion, frame_size)[0] for _ in range(n)])
        positions = starts[:, None] + sign * travel_per_frame * np.arange(num_frames)[None, :]
        pooled[motion] = positions.ravel()
        half = 26 / 2
        assert positions.min() >= half - 1e-9 and positions.max() <= frame_size - half + 1e-9
    assert abs(pooled["left"].mean() - pooled["right"].mean()) < 0.3
    assert abs(pooled["left"].std() - pooled["right"].std()) < 0.3


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="even"):
        SynthConfig(size=63)
    with pytest.raises(ValueError, match="unique"):
        SynthConfig(num_test=30 * 25)
    with pytest.raises(ValueError, match="exceed 1"):
        SynthConfig(hallucination_rate=0.7, vague_rate=0.5)


def test_caption_words_cover_every_caption_of_every_kind() -> None:
    from mama.data.synthvl import caption_words
    from mama.tokenizer import split_words

    words = set(caption_words())
    noisy = make_records(SynthConfig())
    still = make_records(
        SynthConfig(seed=3, num_train=300, hallucination_rate=0.0, vague_rate=0.0, caption_motion=False)
    )
    for records in (noisy, still):
        for split in records.values():
            for record in split:
                for caption in record["captions"]:
                    assert set(split_words(caption["text"])) <= words, caption["text"]
