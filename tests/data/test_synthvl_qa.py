"""The SynthVL QA split: answers right where they should be, noisy where they should be, balanced tests."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mama.data.synthvl import SynthConfig, make_records
from mama.data.synthvl_qa import (
    ANSWERS,
    CONCEPT_QTYPES,
    QTYPES,
    NoiseModel,
    make_questions,
    multiple_choice,
    write_synthvl_qa,
)

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
    noisy = [q for q in questions if q["noise"] != "none"]
    assert 0.27 < len(noisy) / len(questions) < 0.33
    assert {q["noise"] for q in noisy} == {"confused", "frequent"}
    assert all(q["answer"] != q["true_answer"] and q["answer"] in ANSWERS[q["qtype"]] for q in noisy)
    colours = Counter(
        q["true_answer"] if q["noise"] != "none" else q["answer"] for q in questions if q["qtype"] == "colour"
    )
    assert max(colours.values()) > 3 * min(colours.values()), colours  # Zipf over concepts: a long tail


def test_training_errors_are_systematic_like_an_lvlm(records: dict) -> None:
    """Wrong answers follow one fixed confusion per answer or fall back on the frequent answer, and the
    systematically confused units are wrong more often than right (their majority label is wrong)."""
    noise = NoiseModel.from_seed(0)
    questions = make_questions(records["train"], "train", seed=0, noise_rate=0.3)
    true_counts = Counter((q["qtype"], q.get("true_answer", q["answer"])) for q in questions)
    for q in questions:
        if q["noise"] == "confused":
            assert q["answer"] == noise.confusion[q["qtype"]][q["true_answer"]]
        elif q["noise"] == "frequent":  # the type's most frequent true answer, or the next one
            ranked = sorted(ANSWERS[q["qtype"]], key=lambda a, t=q["qtype"]: (-true_counts[(t, a)], a))
            assert q["answer"] == next(a for a in ranked if a != q["true_answer"])
    by_unit: dict[tuple[str, str], Counter] = {}
    for q in questions:
        by_unit.setdefault(_unit(q), Counter())[q["noise"] != "none"] += 1
    hard = {u: c for u, c in by_unit.items() if u in noise.hard}
    assert {q["confusable"] for q in questions if _unit(q) in noise.hard} == {True}
    assert not any(q["confusable"] for q in questions if _unit(q) not in noise.hard)
    hard_wrong = sum(c[True] for c in hard.values()) / sum(c.total() for c in hard.values())
    rest = [c for u, c in by_unit.items() if u not in noise.hard]
    rest_wrong = sum(c[True] for c in rest) / sum(c.total() for c in rest)
    assert 0.55 < hard_wrong < 0.65 and rest_wrong < 0.25, (hard_wrong, rest_wrong)
    # Colour and shape units have one true answer (the concept's): when a unit is well populated, its
    # majority training label is that answer's confusion, not the answer.
    big = [u for u, c in hard.items() if u[0] in ("colour", "shape") and c.total() >= 30]
    assert big
    for qtype, concept in big:
        labels = Counter(q["answer"] for q in questions if _unit(q) == (qtype, concept))
        truth = dict(zip(("colour", "shape"), concept.split(), strict=True))[qtype]
        assert labels.most_common(1)[0][0] == noise.confusion[qtype][truth], (qtype, concept, labels)


def test_noise_model_is_a_fixed_function_of_the_seed() -> None:
    first, again, other = NoiseModel.from_seed(0), NoiseModel.from_seed(0), NoiseModel.from_seed(1)
    assert first == again and first != other
    for qtype, confusion in first.confusion.items():
        assert set(confusion) == set(ANSWERS[qtype])
        assert all(wrong != truth and wrong in ANSWERS[qtype] for truth, wrong in confusion.items())
    per_type = Counter(qtype for qtype, _ in first.hard)
    assert per_type == {"colour": 6, "shape": 6, "motion": 6, "size": 6, "background": 1, "count": 1}


def test_noise_rate_zero_is_clean_and_a_low_rate_stays_systematic(records: dict) -> None:
    assert all(q["noise"] == "none" for q in make_questions(records["train"], "train", noise_rate=0.0))
    low = make_questions(records["train"], "train", noise_rate=0.05)
    noisy = [q for q in low if q["noise"] != "none"]
    assert 0.035 < len(noisy) / len(low) < 0.065
    assert all(q["confusable"] and q["noise"] == "confused" for q in noisy)  # all of it where it is systematic


def test_clean_splits_are_flagged_where_training_is_systematically_wrong(records: dict) -> None:
    noise = NoiseModel.from_seed(0)
    for split in ("meta", "test"):
        questions = make_questions(records[split], split)
        assert all(q["noise"] == "none" and q["confusable"] == (_unit(q) in noise.hard) for q in questions)
        assert any(q["confusable"] for q in questions)


def _unit(question: dict) -> tuple[str, str]:
    """The noise unit of a question dict, from its question text and answer (attributes are not kept)."""
    qtype = question["qtype"]
    truth = question.get("true_answer", question["answer"])
    if qtype not in CONCEPT_QTYPES:
        return qtype, truth
    words = question["question"].rstrip("?").split()
    colour, shape = {
        "colour": (truth, words[-1]),
        "shape": (words[-2], truth),
        "motion": (words[-3], words[-2]),
        "size": (words[-5], words[-4]),
    }[qtype]
    return qtype, f"{colour} {shape}"


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
