"""Video QA data: the questions of each split over the clip sets of their videos, the answer
vocabulary, the tokenizer, and the meta set held out of the training questions."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mama.config import Config, ConfigError
from mama.data.clips import ClipSet, load_clipset
from mama.data.qa_datasets import read_qa_dataset
from mama.data.qa_records import QARecord
from mama.data.records import Caption, VideoRecord, read_jsonl, read_lvlm_captions
from mama.data.synthvl import ensure_dataset
from mama.data.synthvl_qa import is_current, write_synthvl_qa
from mama.metrics.qa import AnswerVocab, normalize_answer
from mama.models import create_tokenizer, get_spec

QA_SPLITS = ("train", "meta", "val", "test")
NO_CAPTION = "[no caption]"  # placeholder caption of a video without one (has_caption False)


@dataclass
class QASplit:
    """The questions of one split over the clip set of its videos.

    Attributes:
        records: the questions (training: only those whose answer is in the vocabulary).
        clips: the split's videos (frames) and, as caption pools, their captions for the contrastive term.
        video_row: (Q,) row of each question's video in ``clips``.
        question_ids, question_mask: (Q, L) tokenised questions.
        answer: (Q,) vocabulary index of each answer, -1 when outside the vocabulary.
        has_caption: (V,) whether a video has a real caption (not the placeholder).
    """

    records: list[QARecord]
    clips: ClipSet
    video_row: Tensor
    question_ids: Tensor
    question_mask: Tensor
    answer: Tensor
    has_caption: Tensor
    dropped_oov: int = 0
    candidate_mask: Tensor | None = None  # (Q, C) multiple choice: False for padding candidates
    # Questions whose video could not be decoded at load: not in ``records``, counted wrong in evaluation.
    lost: list[QARecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def batch(
        self,
        index: Tensor,
        frame_index: Tensor,
        captions: bool,
        generator: torch.Generator | None = None,
        rows: range | None = None,
    ) -> dict[str, Any]:
        """Model batch of questions ``index`` (B,) with frame slots (B, T); uint8 frames under ``frames``,
        the questions' positions under ``question_index`` and decode failures under ``failed``.

        ``generator`` picks each video's caption; ``rows`` keeps only those rows of the batch (this rank's
        share: the random draws are made for the whole batch first, so every rank sees the same ones)."""
        video_row = self.video_row[index]
        pick = torch.zeros(len(video_row), dtype=torch.long)
        if generator is not None:
            pick = (torch.rand(len(video_row), generator=generator) * self.clips.pool_size[video_row]).long()
        if rows is not None:
            index, video_row, pick, frame_index = (
                t[rows.start : rows.stop] for t in (index, video_row, pick, frame_index)
            )
        assembled = self.clips.batch(video_row, self.clips.pool_start[video_row] + pick, frame_index, substitute=False)
        batch = {
            "frames": assembled["frames"],
            "failed": assembled["failed"],
            "question_index": index,
            "input_ids": self.question_ids[index],
            "attention_mask": self.question_mask[index],
            "answer": self.answer[index],
        }
        if self.candidate_mask is not None:
            batch["candidate_mask"] = self.candidate_mask[index]
        if captions:
            batch.update(
                caption_ids=assembled["input_ids"],
                caption_mask=assembled["attention_mask"],
                has_caption=self.has_caption[video_row],
            )
        return batch


@dataclass
class QAData:
    tokenizer: Any
    vocab: AnswerVocab
    splits: dict[str, QASplit]
    lost: dict[str, int] = field(default_factory=dict)  # questions per split whose video is unusable at load

    @property
    def skipped(self) -> dict[str, int]:
        """Per split: videos that could not be decoded (at load or mid-run); their questions are in ``lost``
        (when lost at load) and count as wrong in evaluation."""
        return {name: len(split.clips.skipped) for name, split in self.splits.items()}


def _caption_pools(cfg: Config, root: Path) -> dict[str, list[Caption]]:
    """Captions by video id for the contrastive term: the retrieval JSONL of the same data (SynthVL) and
    ``data.lvlm_captions`` files."""
    pools: dict[str, list[Caption]] = {}
    if cfg.data.format == "jsonl" and (root / cfg.data.train).exists():
        for record in read_jsonl(root / cfg.data.train):
            pools.setdefault(record.id, []).extend(c for c in record.captions if c.source in cfg.data.caption_sources)
    for path in cfg.data.lvlm_captions:
        for video_id, texts in read_lvlm_captions(path).items():
            pools.setdefault(video_id, []).extend(Caption(t, "lvlm") for t in texts)
    return pools


def load_qa_data(
    cfg: Config,
    splits: tuple[str, ...] = QA_SPLITS,
    tokenizer: Any = None,
    vocab: AnswerVocab | None = None,
    progress: bool = True,
) -> QAData:
    """Read the QA splits, build (or reuse) the tokenizer and answer vocabulary, and open the videos."""
    root = ensure_dataset(cfg.data, progress)
    if cfg.data.synthvl and not is_current(root, cfg.data.synthvl_seed, cfg.qa.synthvl_noise_rate):
        write_synthvl_qa(root, cfg.data.synthvl_seed, cfg.qa.synthvl_noise_rate)
    questions = read_questions(cfg, root, splits)
    if vocab is None:
        if "train" not in questions:
            raise ValueError("an answer vocabulary must be given when the train split is not loaded")
        vocab = AnswerVocab.build((q.answer for q in questions["train"]), cfg.qa.num_answers)
    pools = _caption_pools(cfg, root)
    if tokenizer is None:
        texts = [q.question for q in questions.get("train", [])] + [c.text for pool in pools.values() for c in pool]
        tokenizer = create_tokenizer(cfg.model, texts)
    loaded, lost = {}, {}
    for name, records in questions.items():
        dropped = 0
        if name == "train" and cfg.qa.answer_format == "open":
            # Training cannot learn an answer the head cannot output; evaluation keeps every question.
            kept = [q for q in records if vocab.index(q.answer) >= 0]
            dropped = len(records) - len(kept)
            records = kept
        loaded[name] = _open_split(
            cfg, root, name, records, tokenizer, vocab, pools if name == "train" else {}, progress
        )
        loaded[name].dropped_oov = dropped
        lost[name] = len(records) - len(loaded[name])
    return QAData(tokenizer, vocab, loaded, lost)


def read_questions(cfg: Config, root: Path, splits: tuple[str, ...]) -> dict[str, list[QARecord]]:
    """The questions of each split in ``splits``, with the meta split held out of training when
    ``qa.meta`` is "" and ``qa.meta_holdout`` > 0."""
    videos = Path(cfg.data.videos) if cfg.data.videos else None
    holdout = not cfg.qa.meta and cfg.qa.meta_holdout > 0
    if "meta" in splits and not cfg.qa.meta and not holdout:
        raise ConfigError("the QA meta split needs qa.meta (an annotation file) or qa.meta_holdout > 0")
    wanted = [n for n in splits if not (n == "meta" and holdout)]
    if holdout and "meta" in splits and "train" not in wanted:
        wanted.append("train")
    questions = {name: read_qa_dataset(cfg.qa.format, root / getattr(cfg.qa, name), videos) for name in wanted}
    if holdout and "train" in questions:
        questions["train"], meta_questions = hold_out_questions(questions["train"], cfg.qa.meta_holdout)
        if "meta" in splits:
            questions["meta"] = meta_questions
    return {name: questions[name] for name in splits}


def _open_split(
    cfg: Config, root: Path, name: str, records: list[QARecord], tokenizer: Any, vocab: AnswerVocab,
    pools: dict[str, list[Caption]], progress: bool,
) -> QASplit:  # fmt: skip
    """The clip set of a split's videos (captions from ``pools``: the training split's only, since the
    contrastive term is a training loss) and its tokenised questions and answers."""
    videos_of: dict[str, Path] = {}
    for q in records:
        videos_of.setdefault(q.video_id, q.video)
    video_records = [
        VideoRecord(vid, path, pools.get(vid) or [Caption(NO_CAPTION, "human")]) for vid, path in videos_of.items()
    ]
    spec = get_spec(cfg.model.name)
    clips = load_clipset(
        f"qa_{name}", video_records, tokenizer, cfg.data.frame_size, cfg.data.cached_frames or 2 * cfg.data.num_frames,
        ("human", "lvlm"), decode=cfg.data.decode, cache_dir=root / ".cache",
        annotation=root / (getattr(cfg.qa, name) or cfg.qa.train), pixel_mean=spec.pixel_mean, pixel_std=spec.pixel_std,
        progress=progress,
    )  # fmt: skip
    row_of = {r.id: i for i, r in enumerate(clips.records)}
    usable = [q for q in records if q.video_id in row_of]
    if len(usable) != len(records) and name != "train":
        # An evaluation question whose video cannot be decoded still counts: as wrong.
        warnings.warn(
            f"qa_{name}: {len(records) - len(usable)} question(s) lost their video; they count as wrong", stacklevel=2
        )
    candidate_mask = None
    if cfg.qa.answer_format == "mc":
        if any(q.kind != "mc" for q in usable):
            raise ValueError(f"qa.{name}: qa.answer_format is 'mc' but some questions have no candidates")
        width = max(len(q.candidates) for q in usable)
        # (Q*C,) "question candidate" texts, padded to C candidates per question -> (Q, C, L)
        texts = [f"{q.question} {c}" for q in usable for c in [*q.candidates, *[""] * (width - len(q.candidates))]]
        ids, mask = tokenizer(texts)
        ids, mask = ids.view(len(usable), width, -1), mask.view(len(usable), width, -1)
        candidate_mask = torch.tensor([[c < len(q.candidates) for c in range(width)] for q in usable])
        answers = torch.tensor([q.answer_index for q in usable])
    else:
        ids, mask = tokenizer([q.question for q in usable])
        answers = torch.tensor([vocab.index(q.answer) for q in usable])
    return QASplit(
        records=usable,
        clips=clips,
        video_row=torch.tensor([row_of[q.video_id] for q in usable]),
        question_ids=ids,
        question_mask=mask,
        answer=answers,
        has_caption=torch.tensor([r.captions[0].text != NO_CAPTION for r in clips.records]),
        candidate_mask=candidate_mask,
        lost=[q for q in records if q.video_id not in row_of],
    )


def hold_out_questions(records: list[QARecord], count: int, seed: int = 0) -> tuple[list[QARecord], list[QARecord]]:
    """Split training questions into (training, meta): ``count`` meta questions balanced over
    (question type, answer), drawn round-robin over those groups in a seeded order.

    Every question about a held-out video leaves training too (the meta set must not share videos with
    it), so training loses somewhat more than ``count`` questions. A fixed function of the data: every
    run and variant holds out the same questions.
    """
    if not 0 < count < len(records):
        raise ValueError(f"cannot hold out {count} meta questions from {len(records)} training questions")
    rng = torch.Generator().manual_seed(seed)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, q in enumerate(records):
        groups.setdefault((q.qtype, normalize_answer(q.answer)), []).append(i)
    queues = [
        [members[j] for j in torch.randperm(len(members), generator=rng).tolist()]
        for _, members in sorted(groups.items())
    ]
    order = torch.randperm(len(queues), generator=rng).tolist()
    chosen: list[int] = []
    while len(chosen) < count and any(queues):
        for g in order:
            if queues[g] and len(chosen) < count:
                chosen.append(queues[g].pop())
    meta = [records[i] for i in sorted(chosen)]
    meta_videos = {q.video_id for q in meta}
    return [q for q in records if q.video_id not in meta_videos], meta
