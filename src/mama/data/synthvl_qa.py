"""The SynthVL QA split: questions about the generated clips, with ground truth and controlled noise.

Every SynthVL clip shows one shape with known attributes, so questions and answers come for free:

| qtype      | question                                    | answers                     |
|------------|---------------------------------------------|-----------------------------|
| colour     | what colour is the <shape>?                 | 6 colours                   |
| shape      | what shape is the <colour> object?          | 5 shapes                    |
| motion     | which way is the <colour> <shape> moving?   | left / right / up / down    |
| size       | is the <colour> <shape> small or large?     | small / large               |
| background | what colour is the background?              | black / gray / white        |
| count      | how many shapes are there?                  | one / two / three / four    |

- **Long tail in training.** Colour and shape answers follow the training split's Zipf distribution
  over concepts, so some answers are rare.
- **Noisy training labels, wrong the way an LVLM is wrong.** A fraction ``noise_rate`` of the training
  questions carry a wrong answer, and the errors are systematic, not uniform (:class:`NoiseModel`, fixed
  by the seed): a wrong answer is either the true answer's fixed *confusion* (a neighbouring hue, the
  opposite direction, a count off by one, ...; ``meta["noise"] = "confused"``) or the type's most
  frequent training answer (the prior an LVLM falls back on; ``"frequent"``). Some *units* are
  systematically confused: for a fifth of the concepts per colour / shape / motion / size question, and
  for one answer of background and of count, the answer is the confusion ``HARD_RATE`` = 60% of the
  time, so their majority training label is wrong. Each question records ``noise`` (``"none"`` when
  right), ``true_answer`` when wrong, and ``confusable`` (its unit is systematically confused; also on
  the clean splits, so evaluation can report those questions apart). The meta split (clean, balanced
  over concepts) and the evaluation splits are never corrupted.
- **Balanced evaluation.** Val and test keep, per question type, the same number of questions for every
  answer (the rest are dropped), so the majority-answer baseline is at chance.
- **Multiple choice.** The same questions with up to 5 candidates (all values of the attribute, or 4
  wrong ones drawn at random plus the right one), shuffled.

Count questions need clips with several objects, which retrieval's SynthVL does not have: they get their
own clips (``videos/count/<split>_count_<n>.mp4``, one to four static shapes of random colour and shape
in distinct quadrants, same frame size and length as the dataset), a fifth as many as the split has
videos. Training counts are long-tailed (one 50%, two 25%, three 15%, four 10%).

Files, next to the SynthVL JSONL (video paths relative to that folder): ``qa_<split>.jsonl`` (open-ended)
and ``qa_mc_<split>.jsonl`` (multiple choice), in the generic QA JSONL format of ``mama.data.qa_records``,
and ``qa_synthvl.json`` (written last: the settings and the SynthVL dataset they were made for). They are
only written into a folder SynthVL generation made (:func:`mama.data.synthvl.is_synthvl_folder`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mama.data.records import read_jsonl, write_jsonl
from mama.data.synthvl import (
    BACKGROUNDS,
    COLOURS,
    CONCEPTS,
    METADATA_NAME,
    MOTIONS,
    SHAPES,
    SIZES,
    ForeignFolderError,
    is_synthvl_folder,
    shape_mask,
)
from mama.data.video import probe_video, write_video
from mama.fileio import atomic_path

__all__ = ["QTYPES", "NoiseModel", "is_current", "make_questions", "write_synthvl_qa"]

ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "motion": MOTIONS,
    "size": SIZES,
    "background": tuple(BACKGROUNDS),
    "count": ("one", "two", "three", "four"),
}
COUNT_PRIOR = (0.5, 0.25, 0.15, 0.10)  # training distribution of the number of objects
QTYPES = tuple(ANSWERS)
QA_VERSION = 3  # bump when the questions change: older files are rewritten
MAX_CANDIDATES = 5
STAMP_NAME = "qa_synthvl.json"
_SPLIT_SALT = {"train": 11, "meta": 12, "val": 13, "test": 14}
_NOISE_SALT = 15  # the noise model: one draw per seed, shared by every split

# Systematic noise (NoiseModel). A systematically confused unit is wrong more often than right.
HARD_RATE = 0.6
HARD_CONCEPTS = 6  # of the 30 concepts, per question type about the object
CONCEPT_QTYPES = ("colour", "shape", "motion", "size")  # units: (qtype, concept); otherwise (qtype, answer)
# What each answer can be mistaken for; the noise model fixes one per answer. Colours: neighbours on
# the hue circle red-yellow-green-cyan-blue-magenta; shapes: the similar-looking ones at 32 px.
_CONFUSABLE: dict[str, dict[str, tuple[str, ...]]] = {
    "colour": {
        "red": ("magenta", "yellow"), "yellow": ("red", "green"), "green": ("yellow", "cyan"),
        "cyan": ("green", "blue"), "blue": ("cyan", "magenta"), "magenta": ("blue", "red"),
    },
    "shape": {
        "circle": ("square", "diamond"), "square": ("circle", "diamond"), "triangle": ("diamond",),
        "cross": ("square",), "diamond": ("square", "triangle"),
    },
    "motion": {"left": ("right",), "right": ("left",), "up": ("down",), "down": ("up",)},
    "size": {"small": ("large",), "large": ("small",)},
    "background": {"black": ("gray",), "gray": ("black", "white"), "white": ("gray",)},
    "count": {"one": ("two",), "two": ("one", "three"), "three": ("two", "four"), "four": ("three",)},
}  # fmt: skip


@dataclass(frozen=True)
class NoiseModel:
    """The systematic errors of SynthVL QA's training answers, a fixed function of the seed.

    Attributes:
        confusion: ``{qtype: {true answer: the answer it is mistaken for}}``, one per answer.
        hard: the systematically confused units, wrong ``HARD_RATE`` of the time: ``(qtype, "colour
            shape")`` for the questions about the object, ``(qtype, answer)`` for background and count.
    """

    confusion: dict[str, dict[str, str]]
    hard: frozenset[tuple[str, str]]

    @classmethod
    def from_seed(cls, seed: int) -> NoiseModel:
        rng = np.random.default_rng([seed, _NOISE_SALT])
        confusion = {
            qtype: {a: options[int(rng.integers(len(options)))] for a, options in _CONFUSABLE[qtype].items()}
            for qtype in QTYPES
        }
        concepts = [f"{colour} {shape}" for colour, shape in CONCEPTS]
        hard = set()
        for qtype in QTYPES:
            keys = concepts if qtype in CONCEPT_QTYPES else list(ANSWERS[qtype])
            chosen = rng.choice(len(keys), size=HARD_CONCEPTS if qtype in CONCEPT_QTYPES else 1, replace=False)
            hard |= {(qtype, keys[i]) for i in chosen}
        return cls(confusion, frozenset(hard))

    @staticmethod
    def unit(qtype: str, attributes: dict[str, str]) -> tuple[str, str]:
        """The unit of a question: its type and its concept ("colour shape") or, without one, its answer."""
        if qtype in CONCEPT_QTYPES:
            return qtype, f"{attributes['colour']} {attributes['shape']}"
        return qtype, attributes[qtype]


def _question(qtype: str, attributes: dict[str, str]) -> str:
    if qtype == "count":
        return "how many shapes are there?"
    colour, shape = attributes["colour"], attributes["shape"]
    return {
        "colour": f"what colour is the {shape}?",
        "shape": f"what shape is the {colour} object?",
        "motion": f"which way is the {colour} {shape} moving?",
        "size": f"is the {colour} {shape} small or large?",
        "background": "what colour is the background?",
    }[qtype]


def _balance(questions: list[dict[str, Any]], rng: np.random.Generator) -> list[dict[str, Any]]:
    """Per question type, keep the same number of questions for every answer (the rarest answer's count)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for q in questions:
        groups[(q["qtype"], q["answer"])].append(q)
    kept = []
    for qtype in QTYPES:
        counts = [len(groups[(qtype, a)]) for a in ANSWERS[qtype]]
        keep = min(counts)
        for answer in ANSWERS[qtype]:
            group = groups[(qtype, answer)]
            kept += [group[i] for i in sorted(rng.choice(len(group), size=keep, replace=False))]
    return sorted(kept, key=lambda q: q["id"])


def make_questions(
    records: list[dict[str, Any]], split: str, seed: int = 0, noise_rate: float = 0.3
) -> list[dict[str, Any]]:
    """Open-ended questions (JSON-ready dicts) about the SynthVL ``records`` of ``split``.

    Args:
        records: the split's JSONL records (with ``attributes``), e.g. from :func:`mama.data.synthvl.make_records`.
        noise_rate: expected fraction of training questions given a wrong answer (train split only). The
            systematically confused units get ``HARD_RATE`` of it (all of it, at a lower rate, when
            ``noise_rate`` is too small), and every other question the rate that makes the overall
            expectation ``noise_rate``, half "confused" and half "frequent" (module doc).
    """
    if not 0 <= noise_rate < 1:
        raise ValueError(f"noise_rate must be in [0, 1), got {noise_rate}")
    rng = np.random.default_rng([seed, _SPLIT_SALT[split]])
    noise = NoiseModel.from_seed(seed)
    asked = [(r, qtype) for r in records for qtype in QTYPES if qtype in r["attributes"]]  # count clips: count only
    hard = [noise.unit(qtype, r["attributes"]) in noise.hard for r, qtype in asked]
    num_hard = sum(hard)
    hard_rate = min(HARD_RATE, noise_rate * len(asked) / num_hard) if num_hard else 0.0
    base_rate = (noise_rate * len(asked) - hard_rate * num_hard) / max(1, len(asked) - num_hard)
    true_counts = Counter((qtype, r["attributes"][qtype]) for r, qtype in asked)
    by_frequency = {  # most frequent true answer first, ties alphabetical
        qtype: sorted(ANSWERS[qtype], key=lambda a: (-true_counts[(qtype, a)], a)) for qtype in QTYPES
    }
    questions = []
    for (record, qtype), is_hard in zip(asked, hard, strict=True):
        attributes = record["attributes"]
        answer, meta = attributes[qtype], {"noise": "none"}
        if split == "train":
            draw, kind_draw = rng.random(2)  # two draws per question whatever happens: stable streams
            if draw < (hard_rate if is_hard else base_rate):
                kind = "confused" if is_hard or kind_draw < 0.5 else "frequent"
                if kind == "confused":
                    wrong = noise.confusion[qtype][answer]
                else:  # the most frequent answer, or the next one when it is the true answer
                    wrong = next(a for a in by_frequency[qtype] if a != answer)
                answer, meta = wrong, {"noise": kind, "true_answer": answer}
        questions.append({
            "id": f"{record['id']}_{qtype}", "video": record["video"], "video_id": record["id"],
            "question": _question(qtype, attributes), "answer": answer, "qtype": qtype,
            "bucket": record.get("bucket"), "confusable": is_hard, **meta,
        })  # fmt: skip
    return _balance(questions, rng) if split in ("val", "test") else questions


def multiple_choice(question: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """The multiple-choice form of an open-ended question: up to 5 shuffled candidates with the answer."""
    values = ANSWERS[question["qtype"]]
    wrong = [a for a in values if a != question["answer"]]
    if len(values) > MAX_CANDIDATES:
        wrong = [wrong[i] for i in sorted(rng.choice(len(wrong), size=MAX_CANDIDATES - 1, replace=False))]
    candidates = [question["answer"], *wrong]
    order = rng.permutation(len(candidates))
    candidates = [candidates[i] for i in order]
    return {**question, "candidates": candidates, "answer_index": candidates.index(question["answer"])}


def render_count_clip(count: int, num_frames: int, frame_size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (T, S, S, 3): ``count`` (1-4) small static shapes of random shape and colour, one per quadrant."""
    frame = np.empty((frame_size, frame_size, 3), dtype=np.uint8)
    frame[:] = BACKGROUNDS[str(rng.choice(tuple(BACKGROUNDS)))]
    coords = np.arange(frame_size, dtype=np.float64) + 0.5
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    half = 0.14 * frame_size  # fits a quadrant with room for jitter
    quarter = frame_size / 4
    for cell in rng.permutation(4)[:count]:
        cx = quarter * (1 + 2 * (cell % 2)) + rng.uniform(-0.25, 0.25) * quarter
        cy = quarter * (1 + 2 * (cell // 2)) + rng.uniform(-0.25, 0.25) * quarter
        shape, colour = str(rng.choice(SHAPES)), str(rng.choice(tuple(COLOURS)))
        frame[shape_mask(shape, xs - cx, ys - cy, half)] = COLOURS[colour]
    return np.repeat(frame[None], num_frames, axis=0)


def _count_records(
    root: Path, split: str, num: int, seed: int, num_frames: int, frame_size: int
) -> list[dict[str, Any]]:
    """Render the count clips of a split and return their records. Count clips of this split that an
    earlier, larger setting left are deleted; no other file in the folder is touched."""
    rng = np.random.default_rng([seed, _SPLIT_SALT[split], 2])
    folder = root / "videos" / "count"
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {f"{split}_count_{i:05d}.mp4" for i in range(num)}
    own = re.compile(rf"^{re.escape(split)}_count_\d{{5,}}\.mp4$")
    for stale in folder.iterdir():
        if own.match(stale.name) and stale.name not in wanted and stale.is_file():
            stale.unlink()
    records = []
    for i in range(num):
        if split == "train":
            count = 1 + int(rng.choice(4, p=COUNT_PRIOR))
        else:
            count = 1 + i % 4  # evaluation: every count equally often (before balancing)
        clip_rng = np.random.default_rng([seed, _SPLIT_SALT[split], 3, i])
        video = folder / f"{split}_count_{i:05d}.mp4"
        # Rewritten every time: a clip left by other settings (seed, frame size) would not match its record.
        write_video(video, render_count_clip(count, num_frames, frame_size, clip_rng), fps=8)
        records.append(
            {
                "id": f"{split}_count_{i:05d}",
                "video": video.relative_to(root).as_posix(),
                "attributes": {"count": ANSWERS["count"][count - 1]},
            }
        )
    return records


def write_synthvl_qa(
    root: str | os.PathLike[str], seed: int = 0, noise_rate: float = 0.3, progress: bool = True
) -> dict[str, int]:
    """Write the QA files of every split next to the SynthVL dataset at ``root`` (rendering the count clips);
    returns questions per file. ``progress``: say on stderr what is written where.

    Raises:
        ForeignFolderError: ``root`` is not a folder SynthVL generation made (nothing is changed).
        ValueError: the SynthVL dataset there is incomplete.
    """
    root = Path(root)
    if not is_synthvl_folder(root):
        raise ForeignFolderError(
            f"{root} is not a SynthVL folder made by mama, so no SynthVL QA files are written there; for your own "
            "QA data set data.synthvl=false, for SynthVL QA set data.root to an empty or new folder"
        )
    fingerprint = _synthvl_fingerprint(root)
    if fingerprint is None:
        raise ValueError(
            f"{root}: the SynthVL dataset there is incomplete ({METADATA_NAME} missing); generate it first"
        )
    if progress:
        print(f"SynthVL QA: writing questions and count clips into {root}", file=sys.stderr, flush=True)
    counts = {}
    for split in _SPLIT_SALT:
        records = [r.to_dict(root) for r in read_jsonl(root / f"{split}.jsonl")]
        info = probe_video(root / records[0]["video"])
        records += _count_records(root, split, max(8, len(records) // 5), seed, info.num_frames, info.height)
        questions = make_questions(records, split, seed, noise_rate)
        rng = np.random.default_rng([seed, _SPLIT_SALT[split], 1])
        mc = [multiple_choice(q, rng) for q in questions]
        write_jsonl(root / f"qa_{split}.jsonl", questions)
        write_jsonl(root / f"qa_mc_{split}.jsonl", mc)
        counts[f"qa_{split}"] = counts[f"qa_mc_{split}"] = len(questions)
    # Written last: the files are complete, and made by this version with these settings for this dataset.
    with atomic_path(root / STAMP_NAME) as tmp:
        tmp.write_text(json.dumps(_stamp(seed, noise_rate, fingerprint)))
    return counts


def _synthvl_fingerprint(root: Path) -> str | None:
    """Digest of the SynthVL metadata at ``root`` (its settings): regenerated SynthVL makes the QA files stale."""
    try:
        return hashlib.sha256((root / METADATA_NAME).read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def _stamp(seed: int, noise_rate: float, fingerprint: str | None) -> dict[str, Any]:
    return {"version": QA_VERSION, "seed": seed, "noise_rate": noise_rate, "synthvl": fingerprint}


def is_current(root: str | os.PathLike[str], seed: int = 0, noise_rate: float = 0.3) -> bool:
    """Whether ``root`` holds QA files written by this version with these settings for its current SynthVL."""
    root = Path(root)
    fingerprint = _synthvl_fingerprint(root)
    try:
        stamp = json.loads((root / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return False
    return fingerprint is not None and stamp == _stamp(seed, noise_rate, fingerprint)
