"""QA metrics: the answer vocabulary, honest open-ended accuracy, per-type and multiple-choice accuracy."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from mama.metrics.qa import (
    AnswerVocab,
    accuracy_by_type,
    mc_accuracy,
    mc_correct,
    normalize_answer,
    open_accuracy,
    open_correct,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_normalize_answer() -> None:
    assert normalize_answer("  Two   Dogs. ") == "two dogs"
    assert normalize_answer("Yes!?") == "yes"
    assert normalize_answer("t-shirt") == "t-shirt"
    assert normalize_answer("A\tcat\n") == "a cat"


def test_vocab_most_frequent_ties_alphabetical_and_order_free() -> None:
    answers = ["dog"] * 3 + ["Cat."] * 2 + ["cat"] + ["bird", "ant", "cow"] * 2 + ["zebra"]
    vocab = AnswerVocab.build(answers, k=4)
    # cat 3 (normalised), dog 3, then ant / bird / cow tie at 2: alphabetical.
    assert vocab.answers == ["cat", "dog", "ant", "bird"]
    shuffled = answers[:]
    random.Random(0).shuffle(shuffled)
    assert AnswerVocab.build(shuffled, k=4) == vocab
    assert len(vocab) == 4 and vocab.answer(1) == "dog"
    assert vocab.index("Dog.") == 1 and vocab.index("cow") == -1 and vocab.index("zebra") == -1
    assert len(AnswerVocab.build(answers, k=100)) == 6  # fewer distinct answers than k


def test_vocab_save_load_round_trip(tmp_path: Path) -> None:
    vocab = AnswerVocab.build(["yes", "no", "no", "two"], k=3)
    vocab.save(tmp_path / "vocab" / "answers.json")
    loaded = AnswerVocab.load(tmp_path / "vocab" / "answers.json")
    assert loaded == vocab and loaded.answers == ["no", "two", "yes"]
    with pytest.raises(FileNotFoundError):
        AnswerVocab.load(tmp_path / "missing.json")


def test_out_of_vocabulary_answers_count_as_wrong() -> None:
    vocab = AnswerVocab(["yes", "no"])
    answers = ["yes", "no", "cat", "dog", "No."]
    pred = torch.tensor([0, 1, 0, 1, 0])  # right, right, (OOV), (OOV), wrong
    assert open_correct(pred, answers, vocab).tolist() == [True, True, False, False, False]
    honest = open_accuracy(pred, answers, vocab)
    in_vocab = [i for i, a in enumerate(answers) if vocab.index(a) >= 0]
    dropped = open_accuracy(pred[in_vocab], [answers[i] for i in in_vocab], vocab)  # the inflating shortcut
    assert honest == pytest.approx(40.0)
    assert dropped == pytest.approx(200 / 3) and honest < dropped


def test_accuracy_by_type() -> None:
    correct = torch.tensor([True, False, True, True, False])
    assert accuracy_by_type(correct, ["what", "what", "who", "how", "how"]) == {"how": 50.0, "what": 50.0, "who": 100.0}
    with pytest.raises(ValueError):
        accuracy_by_type(correct, ["what"])


def test_mc_accuracy_argmax_and_ties() -> None:
    scores = torch.tensor(
        [
            [0.1, 0.9, 0.3],  # unique max at 1: right
            [2.0, 2.0, 0.0],  # tie at the top including the answer 0: wrong
            [0.0, 1.0, 1.0],  # the answer 0 is below the others: wrong
            [5.0, 1.0, 1.0],  # tie among the others below the answer: right
            [float("nan"), 0.0, 0.0],  # NaN score: wrong
        ]
    )
    answer = torch.tensor([1, 0, 0, 0, 0])
    assert mc_correct(scores, answer).tolist() == [True, False, False, True, False]
    assert mc_accuracy(scores, answer) == pytest.approx(40.0)
    # A constant scorer gets nothing, even where argmax (first index) would hit the answer.
    assert mc_accuracy(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long)) == 0.0
    with pytest.raises(ValueError):
        mc_accuracy(scores, torch.tensor([0, 0, 0, 0, 3]))
