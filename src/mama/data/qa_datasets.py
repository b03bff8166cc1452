"""Readers for the video question answering benchmarks, in their official layouts, into :class:`QARecord`.

One small parser per annotation layout (style guide, habit 6). They share the retrieval readers' parts
(:mod:`mama.data.datasets`: the video lookup :class:`VideoIndex`, located errors, typed field access,
JSON and CSV reading), and one question list that checks ids and resolves videos. ``docs/datasets.md``
("Video question answering") shows every layout as a folder tree.

================  =======================================================  ==============================
format            one split's annotation file                              questions
================  =======================================================  ==============================
``msrvtt_qa``     ``{train,val,test}_qa.json`` (MSRVTT-QA release)         open; qtype: first word
``msvd_qa``       ``{train,val,test}_qa.json`` (+ ``youtube_mapping.txt``) open; qtype: first word
``tgif_qa``       ``{Train,Test,Total}_{frameqa,action,transition}``       FrameQA open; Action and
                  ``_question.csv`` (tab-separated)                        Transition mc, 5 candidates
``nextqa``        ``{train,val,test}.csv`` (+ ``map_vid_vidorID.json``)    mc, 5 candidates
``causal_vidqa``  ``split/{train,valid,test}.pkl`` (or ``.txt``) +         mc, 5 candidates, 6 per video
                  ``QA/<video>/{text,answer}.json``
``jsonl``         ours (:func:`mama.data.qa_records.read_qa_jsonl`)             as written
================  =======================================================  ==============================

Videos are looked up by id in a :class:`VideoIndex` of the ``videos`` folder (default: the annotation
file's folder); a video that is absent gets its expected path, so the loader can report and skip it. A
bad annotation file raises :class:`mama.data.records.AnnotationError` naming the file and where.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mama.data.datasets import (
    VideoIndex,
    load_data_pickle,
    load_json,
    located_errors,
    read_csv_rows,
    typed_field,
    video_index_for,
)
from mama.data.qa_records import QARecord, question_word, read_qa_jsonl
from mama.data.records import AnnotationError, read_text, text_lines

__all__ = [
    "CAUSAL_VIDQA_QTYPES",
    "FRAMEQA_TYPES",
    "NEXTQA_QTYPES",
    "QA_FORMATS",
    "QAReader",
    "read_causal_vidqa",
    "read_msrvtt_qa",
    "read_msvd_qa",
    "read_nextqa",
    "read_qa_dataset",
    "read_qa_jsonl_dataset",
    "read_tgif_qa",
]

# A reader takes one split's annotation file and the videos folder (None: the format's default).
QAReader = Callable[[Path, Path | None], list[QARecord]]

# TGIF-QA FrameQA's "type" column (the COCO-QA question generator's codes).
FRAMEQA_TYPES = ("object", "number", "color", "location")

# NExT-QA's coarse groups, by the first letter of the fine code (CW, CH, TN, TC, TP, DL, DC, DO).
NEXTQA_QTYPES = {"C": "causal", "T": "temporal", "D": "descriptive"}

# Causal-VidQA's six questions per video, in the official order: the id suffix is the position,
# as in the official code's question keys (``<video>_<n>``).
CAUSAL_VIDQA_QTYPES = (
    "descriptive",
    "explanatory",
    "predictive_answer",
    "predictive_reason",
    "counterfactual_answer",
    "counterfactual_reason",
)

_NUM_CHOICES = 5  # every official multiple-choice layout here has five candidates


# ---------------------------------------------------------------------------------------------------
# Shared parts.


class _Questions:
    """Collect questions in annotation order, checking ids are unique, then resolve their videos."""

    def __init__(self) -> None:
        self._records: list[tuple[QARecord, Sequence[str]]] = []
        self._where: dict[str, str] = {}

    def add(self, where: str, aliases: Sequence[str] | None = None, **fields: Any) -> None:
        """Add a question (raises ValueError, to be located by the caller).

        ``aliases`` are the names to look its video up by (default: ``video_id``), the first one also
        giving the expected path of a missing video; ``fields`` are QARecord's, less ``video``.
        """
        record = QARecord(video=Path(), **fields)  # the video is resolved in build()
        if record.id in self._where:
            raise ValueError(f"duplicate question id {record.id!r} (first at {self._where[record.id]})")
        self._where[record.id] = where
        self._records.append((record, tuple(aliases) if aliases else (record.video_id,)))

    def build(self, resolve: Callable[[Sequence[str]], Path]) -> list[QARecord]:
        for record, aliases in self._records:
            record.video = resolve(aliases)
        return [record for record, _ in self._records]


def _int_cell(value: Any, name: str) -> int:
    """An integer written in a CSV cell (or a JSON int): answer indices, type codes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"{name!r} must be an integer, got {value!r}") from None


def _check_columns(path: Path, header: Sequence[str], required: Sequence[str]) -> None:
    missing = [c for c in required if c not in header]
    if missing:
        raise AnnotationError(f"{path}: missing columns {missing}; found {list(header)}")


def _tsv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and (line number, row) pairs of a tab-separated file with a header line.

    Like :func:`mama.data.datasets.read_csv_rows`, but tab-separated and without quoting: TGIF-QA's cells
    are never quoted and its questions and candidates contain stray ``"`` characters.
    """
    return read_csv_rows(path, delimiter="\t", quoted=False)


# ---------------------------------------------------------------------------------------------------
# MSRVTT-QA and MSVD-QA: the same JSON list, different video names.


def _read_msqa(
    annotations: Path, video_names: Callable[[int], tuple[str, ...]], meta_of: Callable[[int], dict[str, Any]]
) -> _Questions:
    """The questions of an MSRVTT-QA / MSVD-QA JSON list; ``video_names(N)``: the aliases of video N."""
    data = load_json(annotations)
    if not isinstance(data, list):
        raise AnnotationError(f"{annotations}: expected a JSON list of questions, got {type(data).__name__}")
    questions = _Questions()
    for i, entry in enumerate(data):
        where = f"entry {i}"
        with located_errors(annotations, where):
            number = _int_cell(typed_field(entry, "video_id", int), "video_id")
            names = video_names(number)
            question = typed_field(entry, "question", str)
            meta = meta_of(number)
            if "category_id" in entry:
                meta["category_id"] = entry["category_id"]
            questions.add(
                where,
                names,
                id=str(_int_cell(typed_field(entry, "id", (int, str)), "id")),
                video_id=names[0],
                question=question,
                answer=typed_field(entry, "answer", str),
                qtype=question_word(question),
                meta=meta,
            )
    return questions


def read_msrvtt_qa(annotations: Path, videos: Path | None) -> list[QARecord]:
    """MSRVTT-QA (Xu et al. 2017): ``{train,val,test}_qa.json``, open-ended.

    Each entry is ``{"answer", "category_id", "id", "question", "video_id"}`` with an integer
    ``video_id`` N: the video is MSR-VTT's ``video<N>`` (``TrainValVideo/`` or ``TestVideo/``, both found
    by the recursive index). qtype is the question's first word (:func:`question_word`), the type
    these results are reported by; ``category_id`` (MSR-VTT's video category) goes to meta.
    """
    questions = _read_msqa(annotations, lambda n: (f"video{n}",), lambda n: {})
    return questions.build(video_index_for(annotations, videos).resolve_first)


_MSVD_MAPPING = "youtube_mapping.txt"


def _msvd_mapping(path: Path) -> dict[str, str]:
    """``youtube_mapping.txt``: one ``<YouTube clip name> vid<N>`` pair per line -> {vid<N>: clip name}."""
    mapping: dict[str, str] = {}
    for line_no, line in enumerate(text_lines(read_text(path)), start=1):
        if not line.strip():
            continue
        with located_errors(path, f"line {line_no}"):
            cells = line.split()
            if len(cells) != 2 or not cells[1].startswith("vid"):
                raise ValueError(f"expected '<clip name> vid<N>', got {line.strip()!r}")
            if cells[1] in mapping:
                raise ValueError(f"{cells[1]} is mapped twice")
            mapping[cells[1]] = cells[0]
    return mapping


def read_msvd_qa(annotations: Path, videos: Path | None) -> list[QARecord]:
    """MSVD-QA (Xu et al. 2017): ``{train,val,test}_qa.json``, open-ended, same entries as MSRVTT-QA.

    The integer ``video_id`` N names ``vid<N>``; with ``youtube_mapping.txt`` next to the file (lines
    ``<YouTube clip name> vid<N>``), a record's ``video_id`` is the original clip name
    (``-4wsuPCjDBc_5_15``), under which the MSVD clips are distributed, and ``meta["vid"]`` keeps
    ``vid<N>``; the video is found under either name. Without the mapping, ``video_id`` is ``vid<N>``.
    """
    mapping_path = annotations.parent / _MSVD_MAPPING
    mapping = _msvd_mapping(mapping_path) if mapping_path.is_file() else None

    def names(number: int) -> tuple[str, ...]:
        vid = f"vid{number}"
        if mapping is None:
            return (vid,)
        if vid not in mapping:
            raise ValueError(f"{vid} is not in {mapping_path}")
        return (mapping[vid], vid)

    questions = _read_msqa(annotations, names, lambda n: {"vid": f"vid{n}"} if mapping is not None else {})
    return questions.build(video_index_for(annotations, videos).resolve_first)


# ---------------------------------------------------------------------------------------------------
# TGIF-QA.

_TGIF_MC_COLUMNS = ("gif_name", "question", "a1", "a2", "a3", "a4", "a5", "answer", "vid_id")
_TGIF_FRAMEQA_COLUMNS = ("gif_name", "question", "answer", "type", "vid_id")
_TGIF_MC_TASKS = {"action": "ACTION", "transition": "TRANS"}  # task -> its vid_id prefix


def _tgif_mc_task(annotations: Path, vid_id: str) -> str:
    """ "action" or "transition": by the file name (``*_action_question.csv``), else the vid_id prefix."""
    name = annotations.name.lower()
    by_name = [task for task in _TGIF_MC_TASKS if task in name]
    if len(by_name) == 1:
        return by_name[0]
    by_id = [task for task, prefix in _TGIF_MC_TASKS.items() if vid_id.startswith(prefix)]
    if len(by_id) == 1:
        return by_id[0]
    raise ValueError(
        f"cannot tell Action from Transition: the file name has neither 'action' nor 'transition' and "
        f"vid_id {vid_id!r} starts with neither ACTION nor TRANS"
    )


def read_tgif_qa(annotations: Path, videos: Path | None) -> list[QARecord]:
    """TGIF-QA (Jang et al. 2017): ``{Train,Test,Total}_<task>_question.csv``, tab-separated.

    The columns decide the task:

    - ``gif_name, question, answer, type, vid_id, key[, description]`` (FrameQA): open-ended; qtype
      is the ``type`` code's name, one of :data:`FRAMEQA_TYPES` (0-3: object, number, color, location).
    - ``gif_name, question, a1..a5, answer, vid_id, key`` (Action, Transition): multiple choice over
      the five candidates, ``answer`` the index (0-4); qtype ``"action"`` or ``"transition"``, from the
      file name, or from the ``vid_id`` prefix (``ACTION12``, ``TRANS23``) when the name has neither.

    A question's id is its ``vid_id`` (unique per question despite the name); the video is the GIF
    ``gif_name``. ``meta`` keeps ``task`` (frameqa / action / transition) and ``key``. The Count task
    (an integer answer scored by mean squared error, not accuracy) is not read.

    Videos: an MP4 (or other video file or frame folder) named after the GIF anywhere under ``videos``,
    else ``<videos>/<gif_name>.gif``, the official GIF download's flat folder.
    """
    header, rows = _tsv_rows(annotations)
    questions = _Questions()
    if all(c in header for c in _TGIF_MC_COLUMNS):
        for line_no, row in rows:
            where = f"line {line_no}"
            with located_errors(annotations, where):
                candidates = [row[f"a{i}"] for i in range(1, _NUM_CHOICES + 1)]
                index = _int_cell(row["answer"], "answer")
                if not 0 <= index < _NUM_CHOICES:
                    raise ValueError(f"'answer' must be a candidate index 0-{_NUM_CHOICES - 1}, got {index}")
                task = _tgif_mc_task(annotations, row["vid_id"])
                questions.add(
                    where,
                    id=row["vid_id"],
                    video_id=row["gif_name"],
                    question=row["question"],
                    answer=candidates[index],
                    kind="mc",
                    candidates=candidates,
                    answer_index=index,
                    qtype=task,
                    meta={"task": task, **({"key": row["key"]} if "key" in row else {})},
                )
    elif all(c in header for c in _TGIF_FRAMEQA_COLUMNS):
        for line_no, row in rows:
            where = f"line {line_no}"
            with located_errors(annotations, where):
                code = _int_cell(row["type"], "type")
                if not 0 <= code < len(FRAMEQA_TYPES):
                    raise ValueError(f"'type' must be 0-3 (object, number, color, location), got {code}")
                questions.add(
                    where,
                    id=row["vid_id"],
                    video_id=row["gif_name"],
                    question=row["question"],
                    answer=row["answer"],
                    qtype=FRAMEQA_TYPES[code],
                    meta={"task": "frameqa", **({"key": row["key"]} if "key" in row else {})},
                )
    elif header[:2] == ["gif_name", "question"] and "answer" in header:
        raise AnnotationError(
            f"{annotations}: this is TGIF-QA Count (columns {header}), a regression task scored by mean "
            "squared error; only FrameQA, Action and Transition are read"
        )
    else:
        raise AnnotationError(
            f"{annotations}: expected TGIF-QA FrameQA columns {list(_TGIF_FRAMEQA_COLUMNS)} or Action / "
            f"Transition columns {list(_TGIF_MC_COLUMNS)} (tab-separated), found {header}"
        )
    video_index = video_index_for(annotations, videos)

    def resolve(aliases: Sequence[str]) -> Path:
        # VideoIndex does not list .gif files: converted videos are searched, then the official GIF.
        return video_index.find(aliases[0]) or video_index.root / f"{aliases[0]}.gif"

    return questions.build(resolve)


# ---------------------------------------------------------------------------------------------------
# NExT-QA.

_NEXTQA_COLUMNS = ("video", "question", "answer", "qid", "type", *(f"a{i}" for i in range(_NUM_CHOICES)))
_NEXTQA_MAP = "map_vid_vidorID.json"


def read_nextqa(annotations: Path, videos: Path | None) -> list[QARecord]:
    """NExT-QA (Xiao et al. 2021), multiple choice: ``{train,val,test}.csv``.

    Columns ``video, frame_count, width, height, question, answer, qid, type, a0..a4``: ``answer`` is
    the index (0-4) of the correct candidate among ``a0..a4``. ``qid`` counts within a video, so a
    question's id is ``<video>_<qid>`` (NExT-QA's own key). qtype is the coarse group of the fine
    ``type`` code: ``C*`` causal (CW why, CH how), ``T*`` temporal (TN next, TP previous, TC concurrent),
    ``D*`` descriptive (DL location, DC count, DO other); the code goes to ``meta["fine_type"]``, and
    ``frame_count``, ``width``, ``height`` (integers) to meta as well.

    Videos sit in VidOR's folders (``NExTVideo/<folder>/<video>.mp4``). With ``map_vid_vidorID.json``
    next to the CSV (``{video: "<folder>/<video>"}``) a missing video's expected path includes its
    folder and ``meta["vidor_path"]`` keeps it; the recursive index finds present videos either way.
    """
    header, rows = read_csv_rows(annotations)
    _check_columns(annotations, header, _NEXTQA_COLUMNS)
    map_path = annotations.parent / _NEXTQA_MAP
    vidor: dict[str, Any] | None = None
    if map_path.is_file():
        vidor = load_json(map_path)
        if not isinstance(vidor, dict):
            raise AnnotationError(f"{map_path}: expected a JSON object video -> '<folder>/<video>'")
    questions = _Questions()
    for line_no, row in rows:
        where = f"line {line_no}"
        with located_errors(annotations, where):
            video = row["video"].strip()
            fine = row["type"].strip()
            if fine[:1] not in NEXTQA_QTYPES:
                raise ValueError(f"unknown question type {fine!r}; expected a code starting with C, T or D")
            candidates = [row[f"a{i}"] for i in range(_NUM_CHOICES)]
            index = _int_cell(row["answer"], "answer")
            if not 0 <= index < _NUM_CHOICES:
                raise ValueError(f"'answer' must be a candidate index 0-{_NUM_CHOICES - 1}, got {row['answer']!r}")
            meta: dict[str, Any] = {"fine_type": fine}
            meta.update({c: _int_cell(row[c], c) for c in ("frame_count", "width", "height") if c in row})
            aliases = [video]
            if vidor is not None:
                path = vidor.get(video)
                if not isinstance(path, str):
                    raise ValueError(f"video {video!r} is not in {map_path}")
                meta["vidor_path"] = path
                aliases = [path, video]
            questions.add(
                where,
                aliases,
                id=f"{video}_{_int_cell(row['qid'], 'qid')}",
                video_id=video,
                question=row["question"],
                answer=candidates[index],
                kind="mc",
                candidates=candidates,
                answer_index=index,
                qtype=NEXTQA_QTYPES[fine[0]],
                meta=meta,
            )
    return questions.build(video_index_for(annotations, videos).resolve_first)


# ---------------------------------------------------------------------------------------------------
# Causal-VidQA.

# (text.json group, candidates key, answer.json key) for each of CAUSAL_VIDQA_QTYPES.
_CAUSAL_PARTS = (
    ("descriptive", "answer"),
    ("explanatory", "answer"),
    ("predictive", "answer"),
    ("predictive", "reason"),
    ("counterfactual", "answer"),
    ("counterfactual", "reason"),
)


def _causal_split(path: Path) -> list[str]:
    """The video ids of a split file: a pickled list of strings, or a text file with one id per line."""
    if path.suffix.lower() == ".pkl":
        ids = load_data_pickle(path, "a Causal-VidQA split (a pickled list of video ids)")
        if not isinstance(ids, (list, tuple, set)) or not all(isinstance(i, str) for i in ids):
            raise AnnotationError(f"{path}: expected a pickled list of video id strings, got {type(ids).__name__}")
        ids = list(ids)
    else:
        ids = [line.strip() for line in text_lines(read_text(path)) if line.strip()]
    for i, video in enumerate(ids, start=1):
        # The id names a folder under QA/: a path (or a byte the file system refuses) would read elsewhere.
        if not video.strip() or video in (".", "..") or any(c in video for c in "/\\\0"):
            raise AnnotationError(f"{path}: entry {i}: {video!r} is not a video id (a plain folder name)")
    return ids


def _causal_qa_folder(annotations: Path) -> Path:
    """``QA/`` next to the split file, or next to its folder (the official ``data/split``, ``data/QA``)."""
    candidates = [annotations.parent / "QA", annotations.parent.parent / "QA"]
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f"format 'causal_vidqa' needs the QA/ folder of per-video annotations next to {annotations.name} "
        f"or next to its folder: neither {candidates[0]} nor {candidates[1]} exists"
    )


def read_causal_vidqa(annotations: Path, videos: Path | None) -> list[QARecord]:
    """Causal-VidQA (Li et al. 2022): a split file of video ids plus per-video annotation folders.

    ``annotations`` is the split (``split/train.pkl``, ``valid.pkl``, ``test.pkl``: a pickled list of
    video ids, read without running any code; or a ``.txt`` with one id per line). Each video has
    ``QA/<video>/text.json`` (``{group: {"question", "answer": [5 candidates], "reason": [5]}}``,
    ``reason`` only for predictive and counterfactual) and ``QA/<video>/answer.json``
    (``{group: {"answer": index, "reason": index}}``); ``QA/`` is looked for next to the split file
    and next to its folder.

    Six multiple-choice records per video, in the official order, with the official question keys
    ``<video>_0`` ... ``<video>_5``; qtypes :data:`CAUSAL_VIDQA_QTYPES`. A predictive or counterfactual
    question gives two records with the same question text: its answer (candidates ``answer``) and its
    reason (candidates ``reason``), with ``meta["part"]`` "answer" or "reason". The official scores
    count such a question right only when both parts are.

    Videos: ``<video>.mp4`` under ``videos`` (default: the folder holding ``QA/``).
    """
    qa_folder = _causal_qa_folder(annotations)
    questions = _Questions()
    for line_no, video in enumerate(_causal_split(annotations), start=1):
        where = f"video {video!r}"
        texts = {}
        for name in ("text.json", "answer.json"):
            path = qa_folder / video / name
            if not path.is_file():
                raise FileNotFoundError(f"{annotations}: video {video!r} (entry {line_no}) has no {path}")
            texts[name] = load_json(path)
        text, answer = texts["text.json"], texts["answer.json"]
        for number, ((group, part), qtype) in enumerate(zip(_CAUSAL_PARTS, CAUSAL_VIDQA_QTYPES, strict=True)):
            with located_errors(qa_folder / video / "text.json", f"{group}.{part}"):
                entry = typed_field(text, group, dict)
                candidates = typed_field(entry, part, list)
                if len(candidates) != _NUM_CHOICES or not all(isinstance(c, str) for c in candidates):
                    raise ValueError(f"expected {_NUM_CHOICES} candidate strings, got {candidates!r}")
                question = typed_field(entry, "question", str)
            with located_errors(qa_folder / video / "answer.json", f"{group}.{part}"):
                index = _int_cell(typed_field(typed_field(answer, group, dict), part, int), part)
                if not 0 <= index < _NUM_CHOICES:
                    raise ValueError(f"must be a candidate index 0-{_NUM_CHOICES - 1}, got {index}")
            with located_errors(annotations, where):
                questions.add(
                    where,
                    id=f"{video}_{number}",
                    video_id=video,
                    question=question,
                    answer=candidates[index],
                    kind="mc",
                    candidates=candidates,
                    answer_index=index,
                    qtype=qtype,
                    meta={"part": part} if group in ("predictive", "counterfactual") else {},
                )
    return questions.build(VideoIndex(videos if videos is not None else qa_folder.parent).resolve_first)


# ---------------------------------------------------------------------------------------------------


def read_qa_jsonl_dataset(annotations: Path, videos: Path | None) -> list[QARecord]:
    """Our JSONL question format (:func:`mama.data.qa_records.read_qa_jsonl`)."""
    return read_qa_jsonl(annotations, videos)


QA_FORMATS: dict[str, QAReader] = {
    "jsonl": read_qa_jsonl_dataset,
    "msrvtt_qa": read_msrvtt_qa,
    "msvd_qa": read_msvd_qa,
    "tgif_qa": read_tgif_qa,
    "nextqa": read_nextqa,
    "causal_vidqa": read_causal_vidqa,
}


def read_qa_dataset(
    format: str, annotations: str | os.PathLike[str], videos: str | os.PathLike[str] | None
) -> list[QARecord]:
    """Read one split of a question answering dataset into :class:`QARecord` objects.

    Args:
        format: a key of :data:`QA_FORMATS` (layouts in the module docstring and docs/datasets.md).
        annotations: the split's annotation file; auxiliary files (MSVD-QA's ``youtube_mapping.txt``,
            NExT-QA's ``map_vid_vidorID.json``, Causal-VidQA's ``QA/`` folder) are looked for next to it.
        videos: folder searched recursively for the videos by id. None: for "jsonl", the paths written
            in the file; for Causal-VidQA, the folder holding ``QA/``; otherwise the annotation file's folder.

    Returns:
        The questions in annotation order, ids unique. A video that is not found gets its expected path
        (see :meth:`VideoIndex.resolve`); the loader reports and skips its questions.

    Raises:
        AnnotationError: a bad line or entry (the message names the file and where).
        ValueError: unknown format.
        FileNotFoundError: the annotation file, a needed auxiliary file or the videos folder is missing.
    """
    reader = QA_FORMATS.get(format)
    if reader is None:
        raise ValueError(f"unknown QA dataset format {format!r}; known formats: {', '.join(QA_FORMATS)}")
    return reader(Path(annotations), None if videos is None else Path(videos))
