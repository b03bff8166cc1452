"""Honest video QA metrics and the answer vocabulary of open-ended QA.

Open-ended QA is classification over the K most frequent *training* answers. A test question whose
answer is outside that vocabulary can never be answered correctly by such a model; it still counts, as
wrong. Dropping it would report accuracy on an easier subset (a common, inflating mistake), so every
accuracy here is over *all* N questions. Accuracies are percentages.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

_SPACES = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Lower-case, strip, collapse runs of whitespace to one space, strip trailing punctuation.

    ``"  Two  Dogs. "`` -> ``"two dogs"``. Inner punctuation stays (``"t-shirt"``).
    """
    text = _SPACES.sub(" ", text.lower()).strip()
    return text.rstrip(string.punctuation).rstrip()


class AnswerVocab:
    """The K most frequent training answers (normalised); frequency ties broken alphabetically, so the
    same answers give the same vocabulary whatever their order. Index i is the open-ended head's class i."""

    def __init__(self, answers: Sequence[str]):
        if len(set(answers)) != len(answers):
            raise ValueError("answer vocabulary has duplicates")
        self.answers = list(answers)
        self._index = {a: i for i, a in enumerate(self.answers)}

    @classmethod
    def build(cls, answers: Iterable[str], k: int) -> AnswerVocab:
        """The ``k`` most frequent of the (normalised) training ``answers``; fewer if fewer are distinct."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        counts = Counter(normalize_answer(a) for a in answers)
        counts.pop("", None)  # an empty answer is a parsing accident, not a class
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return cls([answer for answer, _ in ranked[:k]])

    def index(self, answer: str) -> int:
        """Class index of ``answer`` (normalised first), -1 if out of vocabulary."""
        return self._index.get(normalize_answer(answer), -1)

    def answer(self, i: int) -> str:
        return self.answers[i]

    def __len__(self) -> int:
        return len(self.answers)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AnswerVocab) and self.answers == other.answers

    def save(self, path: Path) -> None:
        """Write ``{"answers": [...]}`` (JSON, index order) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps({"answers": self.answers}, indent=0))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> AnswerVocab:
        path = Path(path)
        try:
            payload = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no answer vocabulary saved here") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("answers"), list):
            raise TypeError(f"{path}: not an answer vocabulary (expected {{'answers': [...]}})")
        return cls(payload["answers"])


def open_correct(pred_index: Tensor, answers: Sequence[str], vocab: AnswerVocab) -> Tensor:
    """(N,) bool: prediction i (a class index) equals the vocabulary index of ground-truth answer i.

    An out-of-vocabulary answer (index -1) is never matched: False, not dropped.
    """
    if pred_index.ndim != 1 or len(pred_index) != len(answers):
        raise ValueError(f"pred_index must be ({len(answers)},), got {tuple(pred_index.shape)}")
    target = torch.tensor([vocab.index(a) for a in answers], dtype=torch.long)
    pred = pred_index.detach().long().cpu()
    return (pred == target) & (target >= 0)


def open_accuracy(pred_index: Tensor, answers: Sequence[str], vocab: AnswerVocab) -> float:
    """Percent of all N questions answered correctly; ``pred_index`` (N,) class indices (argmax of the
    logits), ``answers`` N ground-truth strings. Out-of-vocabulary answers count as wrong."""
    correct = open_correct(pred_index, answers, vocab)
    if len(correct) == 0:
        raise ValueError("no questions to score")
    return 100.0 * float(correct.float().mean())


def accuracy_by_type(correct: Tensor, qtypes: Sequence[str]) -> dict[str, float]:
    """Percent correct per question type: ``correct`` (N,) bool, ``qtypes`` N type names -> {type: %},
    keys sorted. Every question of a type counts (out-of-vocabulary ones included, as wrong)."""
    if correct.ndim != 1 or len(correct) != len(qtypes):
        raise ValueError(f"correct must be ({len(qtypes)},), got {tuple(correct.shape)}")
    flags = correct.detach().bool().cpu().tolist()
    hits: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for flag, qtype in zip(flags, qtypes, strict=True):
        totals[qtype] += 1
        hits[qtype] += int(flag)
    return {qtype: 100.0 * hits[qtype] / totals[qtype] for qtype in sorted(totals)}


def mc_correct(scores: Tensor, answer_index: Tensor) -> Tensor:
    """(N,) bool: the correct candidate is the *unique* maximum of its row of ``scores`` (N, C).

    A tie at the top counts as wrong (argmax would pick the first tied index, so a constant scorer would
    score 100% on a benchmark whose answers are always candidate 0); a NaN score makes the row wrong.
    """
    if scores.ndim != 2 or answer_index.shape != (scores.shape[0],):
        raise ValueError(
            f"scores must be (N, C) and answer_index (N,), got {tuple(scores.shape)}, {tuple(answer_index.shape)}"
        )
    scores = scores.detach().float().cpu()
    answer_index = answer_index.detach().long().cpu()
    if bool(((answer_index < 0) | (answer_index >= scores.shape[1])).any()):
        raise ValueError(f"answer_index outside 0..{scores.shape[1] - 1}")
    correct_score = scores.gather(1, answer_index[:, None]).squeeze(1)  # (N,)
    others = scores.scatter(1, answer_index[:, None], float("-inf"))  # (N, C), the correct one masked out
    return correct_score > others.max(dim=1).values


def mc_accuracy(scores: Tensor, answer_index: Tensor) -> float:
    """Percent of N multiple-choice questions whose correct candidate (``answer_index`` (N,)) is the unique
    argmax of ``scores`` (N, C); ties at the top count as wrong (see :func:`mc_correct`)."""
    correct = mc_correct(scores, answer_index)
    if len(correct) == 0:
        raise ValueError("no questions to score")
    return 100.0 * float(correct.float().mean())
