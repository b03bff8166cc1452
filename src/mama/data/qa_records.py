"""The common question record of every video question answering dataset, and its JSONL reader and writer.

Every QA reader (:mod:`mama.data.qa_datasets`) produces :class:`QARecord` objects, so answer vocabularies,
loaders and metrics never need to know which benchmark a question came from.

Two kinds of question:

- ``"open"``: open-ended; ``answer`` is the answer text (MSRVTT-QA, MSVD-QA, TGIF-QA FrameQA).
- ``"mc"``: multiple choice; ``candidates`` lists the choices, ``answer_index`` points at the correct
  one and ``answer`` is its text (NExT-QA, TGIF-QA Action and Transition, Causal-VidQA).

Our JSONL format, one object per line (blank lines are ignored)::

    {"id": "q1",                                # question id, unique in the file
     "video": "videos/vid1.mp4",                # and / or "video_id": "vid1"
     "question": "what is the man doing?",
     "answer": "cooking",                       # multiple choice: the correct candidate's text ...
     "candidates": ["...", "..."],              # optional: present -> multiple choice
     "answer_index": 1,                         # ... and / or its index into "candidates"
     "qtype": "what",                           # optional
     ...}                                       # any other key is kept in QARecord.meta
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mama.data.datasets import VideoIndex, located_errors, read_json_rows, typed_field
from mama.data.records import write_jsonl

__all__ = [
    "QA_KINDS",
    "QUESTION_WORDS",
    "QARecord",
    "question_word",
    "read_qa_jsonl",
    "write_qa_jsonl",
]

QA_KINDS = ("open", "mc")

# The question types MSRVTT-QA and MSVD-QA results are reported by: the question's first word.
QUESTION_WORDS = ("what", "who", "how", "when", "where")

# Keys of QARecord.to_dict(); meta may not use them, so a record survives a JSONL round trip.
_RESERVED_KEYS = frozenset(
    {"id", "video_id", "video", "question", "answer", "kind", "candidates", "answer_index", "qtype"}
)


def question_word(question: str) -> str:
    """The question type by first word: one of :data:`QUESTION_WORDS`, else ``"other"``.

    Case and surrounding punctuation are ignored (``"What's"`` is not "what": it is "other", as in the
    published per-type breakdowns, which split on the literal word).
    """
    words = question.strip().split(maxsplit=1)
    first = words[0].lower().strip(".,;:!?\"'()") if words else ""
    return first if first in QUESTION_WORDS else "other"


@dataclass
class QARecord:
    """One question about one video.

    Attributes:
        id: question id, unique within a split.
        video_id: the video's id in its dataset (several questions share a video).
        video: path of the video file or frame folder; a video that is absent points at its expected
            path (like :class:`mama.data.records.VideoRecord`), and the loader reports and skips it.
        question: the question text.
        answer: open-ended: the answer text; multiple choice: the text of the correct candidate.
        kind: ``"open"`` or ``"mc"`` (:data:`QA_KINDS`).
        candidates: multiple choice only: the choices, at least two.
        answer_index: multiple choice only: index of the correct candidate.
        qtype: the question type when the dataset has one ("" otherwise); see docs/datasets.md.
        meta: any other field of the source (e.g. NExT-QA's fine type code, TGIF-QA's ``key``).

    Raises:
        ValueError: inconsistent fields (unknown kind, a multiple-choice question with fewer than two
            candidates, an ``answer_index`` out of range or ``answer`` not its candidate, candidates on
            an open question, a blank id or question, meta using a reserved key).
    """

    id: str
    video_id: str
    video: Path
    question: str
    answer: str
    kind: str = "open"
    candidates: list[str] = field(default_factory=list)
    answer_index: int | None = None
    qtype: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("id", "video_id", "question"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if not isinstance(self.answer, str):
            raise ValueError(f"answer must be a string, got {type(self.answer).__name__}: {self.answer!r}")
        if not isinstance(self.qtype, str):
            raise ValueError(f"qtype must be a string, got {self.qtype!r}")
        if self.kind not in QA_KINDS:
            raise ValueError(f"unknown question kind {self.kind!r}, expected one of {QA_KINDS}")
        reserved = sorted(_RESERVED_KEYS & set(self.meta))
        if reserved:
            raise ValueError(f"meta may not use the record's own keys {reserved}")
        if self.kind == "open":
            if self.candidates or self.answer_index is not None:
                raise ValueError("an open-ended question has no candidates or answer_index")
            if not self.answer.strip():
                raise ValueError("an open-ended question needs a non-empty answer")
            return
        if not isinstance(self.candidates, list) or not all(isinstance(c, str) for c in self.candidates):
            raise ValueError(f"candidates must be a list of strings, got {self.candidates!r}")
        if len(self.candidates) < 2:
            raise ValueError(f"a multiple-choice question needs at least 2 candidates, got {len(self.candidates)}")
        index = self.answer_index
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(self.candidates):
            raise ValueError(f"answer_index must be an index into the {len(self.candidates)} candidates, got {index!r}")
        if self.answer != self.candidates[index]:
            raise ValueError(f"answer {self.answer!r} is not candidate {index} ({self.candidates[index]!r})")

    def to_dict(self, root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """JSON-ready form, read back by :func:`read_qa_jsonl`; ``video`` relative to ``root`` when given."""
        video = Path(os.path.relpath(self.video, root)) if root is not None else self.video
        out: dict[str, Any] = {
            "id": self.id,
            "video_id": self.video_id,
            "video": video.as_posix(),
            "question": self.question,
            "answer": self.answer,
            "kind": self.kind,
        }
        if self.kind == "mc":
            out["candidates"] = list(self.candidates)
            out["answer_index"] = self.answer_index
        out["qtype"] = self.qtype
        out.update(self.meta)
        return out


def _multiple_choice(obj: Mapping[str, Any]) -> tuple[list[str], int, str]:
    """(candidates, answer_index, answer) of a JSONL line with "candidates"; the two answers must agree."""
    candidates = typed_field(obj, "candidates", list)
    if not all(isinstance(c, str) for c in candidates):
        raise ValueError('"candidates" must be a list of strings')
    if "answer_index" in obj:
        index = typed_field(obj, "answer_index", int)
        if isinstance(index, bool) or not 0 <= index < len(candidates):
            raise ValueError(f'"answer_index" must be an index into the {len(candidates)} candidates, got {index!r}')
        if "answer" in obj and typed_field(obj, "answer", str) != candidates[index]:
            raise ValueError(f'"answer" {obj["answer"]!r} is not candidate {index} ({candidates[index]!r})')
        return candidates, index, candidates[index]
    answer = typed_field(obj, "answer", str)
    matches = [i for i, c in enumerate(candidates) if c == answer]
    if len(matches) != 1:
        found = "is not among" if not matches else "occurs more than once in"
        raise ValueError(f'"answer" {answer!r} {found} the candidates; give "answer_index"')
    return candidates, matches[0], answer


def _parse_line(obj: Any, root: Path, index: VideoIndex | None) -> QARecord:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "video" not in obj and "video_id" not in obj:
        raise ValueError('missing "video" or "video_id"')
    video_field = typed_field(obj, "video", str) if "video" in obj else None
    video_id = typed_field(obj, "video_id", str) if "video_id" in obj else Path(video_field or "").stem
    if "candidates" in obj:
        candidates, answer_index, answer = _multiple_choice(obj)
        kind = "mc"
    else:
        if "answer_index" in obj:
            raise ValueError('"answer_index" without "candidates"')
        candidates, answer_index, answer, kind = [], None, typed_field(obj, "answer", str), "open"
    if "kind" in obj and obj["kind"] != kind:
        raise ValueError(f'"kind" is {obj["kind"]!r} but the line {"has" if candidates else "has no"} candidates')
    if index is not None:
        # A videos folder: look the file up by the name written, then by the video id.
        video = index.resolve_first([Path(video_field).name, video_id] if video_field else [video_id])
    elif video_field:
        # abspath, not resolve: keep symlinked dataset folders pointing where the user put them.
        video = Path(os.path.abspath(root / video_field))
    else:
        video = root / f"{video_id}.mp4"
    return QARecord(
        id=typed_field(obj, "id", str),
        video_id=video_id,
        video=video,
        question=typed_field(obj, "question", str),
        answer=answer,
        kind=kind,
        candidates=candidates,
        answer_index=answer_index,
        qtype=typed_field(obj, "qtype", str) if "qtype" in obj else "",
        meta={k: v for k, v in obj.items() if k not in _RESERVED_KEYS},
    )


def read_qa_jsonl(path: str | os.PathLike[str], videos: str | os.PathLike[str] | None = None) -> list[QARecord]:
    """Read our JSONL question format (module docstring).

    Args:
        path: the JSONL file (a JSON list of the same objects is accepted too).
        videos: folder searched recursively for the videos, by the file name of ``"video"`` and then by
            ``"video_id"``. None: ``"video"`` is a path relative to the JSONL's folder, and a line with
            only ``"video_id"`` points at ``<folder>/<video_id>.mp4``.

    Returns:
        The questions in file order; a line with ``"candidates"`` is multiple choice.

    Raises:
        mama.data.records.AnnotationError: a bad line (not UTF-8, invalid JSON, a missing field,
            candidates that do not agree with ``answer`` / ``answer_index``, a duplicate id); the message
            names the file and line.
        FileNotFoundError: the file, or the ``videos`` folder, does not exist.
    """
    path = Path(path)
    index = VideoIndex(videos) if videos is not None else None
    records: list[QARecord] = []
    first_seen: dict[str, str] = {}
    for where, obj in read_json_rows(path):
        with located_errors(path, where):
            record = _parse_line(obj, path.parent, index)
            if record.id in first_seen:
                raise ValueError(f"duplicate question id {record.id!r} (first at {first_seen[record.id]})")
        first_seen[record.id] = where
        records.append(record)
    return records


def write_qa_jsonl(
    path: str | os.PathLike[str], records: Iterable[QARecord], root: str | os.PathLike[str] | None = None
) -> Path:
    """Write questions in our JSONL format, atomically (:func:`mama.data.records.write_jsonl`).

    ``video`` is written relative to ``root`` when given (e.g. the output's folder, so the file reads
    back with :func:`read_qa_jsonl`), absolute otherwise.
    """
    return write_jsonl(path, (record.to_dict(root) for record in records))
