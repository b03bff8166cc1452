from pathlib import Path

import pytest

from mama.data.meta_split import caption_features, hold_out_balanced
from mama.data.records import Caption, VideoRecord

TOPICS = {
    "cooking": "a chef chops onions and stirs soup in a kitchen pan",
    "soccer": "players kick the ball across the football pitch and score a goal",
    "music": "a band plays guitar and drums on stage while the singer sings",
}


def _records(counts: dict[str, int]) -> list[VideoRecord]:
    records = []
    for topic, count in counts.items():
        words = TOPICS[topic].split()
        for i in range(count):
            # Each caption drops a different word, so no two are identical.
            text = " ".join(w for j, w in enumerate(words) if j != i % len(words))
            captions = [Caption(text, "human"), Caption(f"an lvlm caption {i}", "lvlm")]
            records.append(VideoRecord(f"{topic}{i}", Path(f"/v/{topic}{i}.mp4"), captions, {"topic": topic}))
    return records


def test_meta_set_is_balanced_over_topics_even_when_training_is_not() -> None:
    records = _records({"cooking": 60, "soccer": 20, "music": 10})
    train, meta = hold_out_balanced(records, 9, seed=0, clusters=3)
    topics = [r.meta["topic"] for r in meta]
    assert sorted(topics) == ["cooking"] * 3 + ["music"] * 3 + ["soccer"] * 3
    assert len(train) == 81 and not {r.id for r in train} & {r.id for r in meta}
    assert all(c.source == "human" for r in meta for c in r.captions)  # never LVLM captions
    assert [r.id for r in train] == [r.id for r in records if r.id not in {m.id for m in meta}]  # order kept


def test_hold_out_is_deterministic_and_checks_its_size() -> None:
    records = _records({"cooking": 12, "soccer": 12, "music": 12})
    first = [r.id for r in hold_out_balanced(records, 6)[1]]
    assert first == [r.id for r in hold_out_balanced(records, 6)[1]]
    with pytest.raises(ValueError, match="cannot hold out 36"):
        hold_out_balanced(records, 36)


def test_caption_features_ignore_lvlm_captions_and_stopwords() -> None:
    a = VideoRecord("a", Path("a"), [Caption("the chef chops onions", "human"), Caption("guitar drums", "lvlm")])
    b = VideoRecord("b", Path("b"), [Caption("a chef chops onions", "human")])
    features = caption_features([a, b])
    assert features[0] @ features[1] == pytest.approx(1.0)
