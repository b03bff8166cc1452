"""The SynthVL QA split: answers right where they should be, noisy where they should be, balanced tests."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mama.data.synthvl import SynthConfig, make_records
from mama.data.synthvl_qa import ANSWERS, QTYPES, make_questions, multiple_choice, write_synthvl_qa

CFG = SynthConfig(seed=0, num_train=600, num_meta=60, num_val=60, num_test=120)


@pytest.fixture(scope="module")
def records() -> dict:
    return make_records(CFG)


def test_clean_splits_answer_from_the_attributes(records: dict) -> None:
    by_id = {r["id"]: r for r in records["meta"]}
    questions = make_questions(records["meta"], "meta")
    assert len(questions) == (len(QTYPES) - 1) * len(records["meta"])  # count questions come with count clips
    for q in questions:
        assert q["answer"] == by_id[q["video_id"]]["attributes"][q["qtype"]] and q["noise"] == "none"


def test_training_answers_are_noisy_at_the_asked_rate_and_long_tailed(records: dict) -> None:
    questions = make_questions(records["train"], "train", noise_rate=0.3)
    noisy = [q for q in questions if q["noise"] == "wrong_answer"]
    assert 0.26 < len(noisy) / len(questions) < 0.34
    assert all(q["answer"] != q["true_answer"] and q["answer"] in ANSWERS[q["qtype"]] for q in noisy)
    colours = Counter(
        q["true_answer"] if q["noise"] != "none" else q["answer"] for q in questions if q["qtype"] == "colour"
    )
    assert max(colours.values()) > 3 * min(colours.values()), colours  # Zipf over concepts: a long tail


def test_evaluation_is_balanced_per_question_type(records: dict) -> None:
    questions = make_questions(records["test"], "test")
    for qtype in QTYPES[:-1]:  # count: see the file test
        counts = Counter(q["answer"] for q in questions if q["qtype"] == qtype)
        assert set(counts) == set(ANSWERS[qtype]) and len(set(counts.values())) == 1, (qtype, counts)
    assert all(q["noise"] == "none" for q in questions)


def test_multiple_choice_keeps_the_answer_among_distinct_candidates(records: dict) -> None:
    rng = np.random.default_rng(0)
    for q in make_questions(records["val"], "val"):
        mc = multiple_choice(q, rng)
        assert mc["candidates"][mc["answer_index"]] == q["answer"]
        assert len(set(mc["candidates"])) == len(mc["candidates"]) == min(5, len(ANSWERS[q["qtype"]]))


def test_files_are_written_next_to_synthvl_and_are_deterministic(tiny_synthvl: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_synthvl, root, ignore=shutil.ignore_patterns(".cache"))
    counts = write_synthvl_qa(root)
    first = {name: (root / f"{name}.jsonl").read_bytes() for name in counts}
    write_synthvl_qa(root)
    assert all((root / f"{name}.jsonl").read_bytes() == data for name, data in first.items())
    line = json.loads((root / "qa_mc_test.jsonl").read_text().splitlines()[0])
    assert line["video"].startswith("videos/") and line["candidates"][line["answer_index"]] == line["answer"]
    count_questions = [json.loads(x) for x in (root / "qa_test.jsonl").read_text().splitlines() if '"count"' in x]
    assert Counter(q["answer"] for q in count_questions) == Counter(
        {a: len(count_questions) // 4 for a in ANSWERS["count"]}
    )
    train_counts = Counter(
        json.loads(x)["answer"] for x in (root / "qa_train.jsonl").read_text().splitlines() if '"qtype": "count"' in x
    )
    assert train_counts["one"] > train_counts["four"]  # long-tailed in training


def test_count_clips_show_the_number_of_shapes() -> None:
    from mama.data.synthvl_qa import render_count_clip

    for count in (1, 2, 3, 4):
        clip = render_count_clip(count, num_frames=3, frame_size=64, rng=np.random.default_rng(count))
        background = clip[0, 0, 0]
        quadrants = [clip[0, y : y + 32, x : x + 32] for y in (0, 32) for x in (0, 32)]
        filled = sum(bool((q != background).any()) for q in quadrants)
        assert clip.shape == (3, 64, 64, 3) and filled == count and (clip[0] == clip[-1]).all()
