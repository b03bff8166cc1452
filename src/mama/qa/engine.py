"""Training and evaluation of open-ended video QA with meta-learned sample weighting (``task: qa``).

``train_qa(cfg)`` reads like the retrieval engine: data, model, optimisers, then one loop in which every
step is forward -> (meta update) -> weighted backward -> optimiser step. Each sample's loss is the
answer cross-entropy plus ``qa.contrastive_weight`` x the angular margin contrastive loss between the
video and one of its captions (when the videos have captions); the weighting net weights that per-sample
loss, and its meta set is the clean, balanced ``qa.meta`` split. Evaluation is top-1 accuracy over the
*whole* split: a question whose answer is outside the training answer vocabulary counts as wrong.

Run folder: ``config.yaml``, ``log.jsonl``, ``answers.json`` (the vocabulary), ``metrics.json``, and a
final checkpoint under ``checkpoints/``.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call
from tqdm.auto import tqdm

from mama.checkpoint import save_checkpoint
from mama.config import Config, ConfigError, save_config, to_dict
from mama.data.clips import ClipSet, _generator, load_clipset
from mama.data.records import Caption, VideoRecord, read_jsonl
from mama.data.sampling import segment_random_indices, uniform_indices
from mama.engine import build_optimizer, ensure_dataset
from mama.models import create_model, create_tokenizer, get_spec
from mama.precision import autocast
from mama.qa.datasets import read_qa_dataset
from mama.qa.metrics import AnswerVocab, accuracy_by_type, mc_correct, normalize_answer, open_correct
from mama.qa.model import VideoQAModel
from mama.qa.records import QARecord
from mama.qa.task import QATask
from mama.weighting import MetaWeighting, meta_forward_context

QA_SPLITS = ("train", "meta", "val", "test")


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

    def __len__(self) -> int:
        return len(self.records)

    def batch(self, index: Tensor, frame_index: Tensor, captions: bool, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Model batch of questions ``index`` (B,) with frame slots (B, T); uint8 frames under ``frames``."""
        rows = self.video_row[index]
        pick = torch.zeros(len(rows), dtype=torch.long)
        if generator is not None:
            pick = (torch.rand(len(rows), generator=generator) * self.clips.pool_size[rows]).long()
        assembled = self.clips.batch(rows, self.clips.pool_start[rows] + pick, frame_index, substitute=False)
        batch = {
            "frames": assembled["frames"],
            "input_ids": self.question_ids[index],
            "attention_mask": self.question_mask[index],
            "answer": self.answer[index],
        }
        if self.candidate_mask is not None:
            batch["candidate_mask"] = self.candidate_mask[index]
        if captions:
            batch.update(caption_ids=assembled["input_ids"], caption_mask=assembled["attention_mask"], has_caption=self.has_caption[rows])
        return batch


@dataclass
class QAData:
    tokenizer: Any
    vocab: AnswerVocab
    splits: dict[str, QASplit]
    skipped: dict[str, int] = field(default_factory=dict)


def _caption_pools(cfg: Config, root: Path) -> dict[str, list[Caption]]:
    """Captions by video id for the contrastive term: the retrieval JSONL of the same data (SynthVL) and
    ``data.lvlm_captions`` files."""
    pools: dict[str, list[Caption]] = {}
    if cfg.data.format == "jsonl" and (root / cfg.data.train).exists():
        for record in read_jsonl(root / cfg.data.train):
            pools.setdefault(record.id, []).extend(c for c in record.captions if c.source in cfg.data.caption_sources)
    from mama.data.records import read_lvlm_captions

    for path in cfg.data.lvlm_captions:
        for video_id, texts in read_lvlm_captions(path).items():
            pools.setdefault(video_id, []).extend(Caption(t, "lvlm") for t in texts)
    return pools


def load_qa_data(cfg: Config, splits: tuple[str, ...] = QA_SPLITS, tokenizer: Any = None, vocab: AnswerVocab | None = None, progress: bool = True) -> QAData:
    """Read the QA splits, build (or reuse) the tokenizer and answer vocabulary, and open the videos."""
    root = ensure_dataset(cfg, progress)
    if cfg.data.synthvl:
        from mama.qa.synthvl_qa import is_current, write_synthvl_qa

        if not is_current(root, cfg.data.synthvl_seed, cfg.qa.synthvl_noise_rate):
            write_synthvl_qa(root, cfg.data.synthvl_seed, cfg.qa.synthvl_noise_rate)
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
    questions = {name: questions[name] for name in splits}
    if vocab is None:
        if "train" not in questions:
            raise ValueError("an answer vocabulary must be given when the train split is not loaded")
        vocab = AnswerVocab.build((q.answer for q in questions["train"]), cfg.qa.num_answers)
    pools = _caption_pools(cfg, root)
    if tokenizer is None:
        texts = [q.question for q in questions.get("train", [])] + [c.text for pool in pools.values() for c in pool]
        tokenizer = create_tokenizer(cfg.model, texts)
    spec = get_spec(cfg.model.name)
    slots = cfg.data.cached_frames or 2 * cfg.data.num_frames
    loaded, skipped = {}, {}
    for name, records in questions.items():
        dropped = 0
        if name == "train" and cfg.qa.answer_format == "open":
            # Training cannot learn an answer the head cannot output; evaluation keeps every question.
            kept = [q for q in records if vocab.index(q.answer) >= 0]
            dropped = len(records) - len(kept)
            records = kept
        videos_of = {}
        for q in records:
            videos_of.setdefault(q.video_id, q.video)
        # Captions join only the training videos' pools (the contrastive term is a training loss).
        video_records = [
            VideoRecord(vid, path, (pools.get(vid) if name == "train" else None) or [Caption("[no caption]", "human")])
            for vid, path in videos_of.items()
        ]
        clips = load_clipset(
            f"qa_{name}", video_records, tokenizer, cfg.data.frame_size, slots, ("human", "lvlm"),
            decode=cfg.data.decode, cache_dir=root / ".cache", annotation=root / (getattr(cfg.qa, name) or cfg.qa.train),
            pixel_mean=spec.pixel_mean, pixel_std=spec.pixel_std, progress=progress,
        )  # fmt: skip
        row_of = {r.id: i for i, r in enumerate(clips.records)}
        usable = [q for q in records if q.video_id in row_of]
        if len(usable) != len(records) and name != "train":
            # An evaluation question whose video cannot be decoded still counts: as wrong.
            warnings.warn(f"qa_{name}: {len(records) - len(usable)} question(s) lost their video; they count as wrong", stacklevel=2)
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
        loaded[name] = QASplit(
            records=usable,
            clips=clips,
            video_row=torch.tensor([row_of[q.video_id] for q in usable]),
            question_ids=ids,
            question_mask=mask,
            answer=answers,
            has_caption=torch.tensor([r.captions[0].text != "[no caption]" for r in clips.records]),
            dropped_oov=dropped,
            candidate_mask=candidate_mask,
        )
        skipped[name] = len(clips.skipped) + (len(records) - len(usable))
    return QAData(tokenizer, vocab, loaded, skipped)


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
    queues = [[members[j] for j in torch.randperm(len(members), generator=rng).tolist()] for _, members in sorted(groups.items())]
    order = torch.randperm(len(queues), generator=rng).tolist()
    chosen: list[int] = []
    while len(chosen) < count and any(queues):
        for g in order:
            if queues[g] and len(chosen) < count:
                chosen.append(queues[g].pop())
    meta = [records[i] for i in sorted(chosen)]
    meta_videos = {q.video_id for q in meta}
    return [q for q in records if q.video_id not in meta_videos], meta


def rare_answers(train: QASplit) -> set[tuple[str, str]]:
    """(question type, answer) pairs in the least frequent third of each type's training answers."""
    by_type: dict[str, Counter[str]] = {}
    for q in train.records:
        by_type.setdefault(q.qtype, Counter())[normalize_answer(q.answer)] += 1
    rare = set()
    for qtype, counts in by_type.items():
        ranked = sorted(counts, key=lambda a: (counts[a], a))  # least frequent first
        rare |= {(qtype, a) for a in ranked[: max(1, len(ranked) // 3)]}
    return rare


@torch.no_grad()
def evaluate_qa(task: QATask, split: QASplit, cfg: Config, lost: int = 0, train: QASplit | None = None) -> dict[str, float]:
    """Top-1 accuracy (percent) over every question of the split, per question type, per concept bucket
    when the questions carry one, and (given ``train``) on questions whose answer is rare in training
    (``acc_rare_answers``) or not; ``lost`` questions without a video count as wrong."""
    task.eval()
    device = next(task.parameters()).device
    frame_index = uniform_indices(split.clips.num_slots, cfg.data.num_frames)
    preds = []
    for start in range(0, len(split), cfg.eval.batch_size):
        index = torch.arange(start, min(start + cfg.eval.batch_size, len(split)))
        batch = split.batch(index, frame_index.expand(len(index), -1), captions=False)
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["video"] = split.clips.to_model_input(batch.pop("frames"))
        # The heads directly, not the task: an evaluation answer may be outside the vocabulary (no loss).
        with autocast(device, cfg.train.precision):
            if cfg.qa.answer_format == "mc":
                scores = task.model.mc_scores(batch["video"], batch["input_ids"], batch["attention_mask"])
                scores = scores.float().masked_fill(~batch["candidate_mask"], float("-inf"))
            else:
                scores = task.model.open_logits(batch["video"], batch["input_ids"], batch["attention_mask"])
        preds.append(scores.float().cpu())
    scores = torch.cat(preds)
    if cfg.qa.answer_format == "mc":
        correct = mc_correct(scores, split.answer)
    else:
        correct = open_correct(scores.argmax(1), [q.answer for q in split.records], task_vocab(task))
    total = len(split) + lost
    metrics = {"accuracy": 100.0 * float(correct.sum()) / total, "num_questions": float(total)}
    for qtype, value in accuracy_by_type(correct, [q.qtype or "all" for q in split.records]).items():
        metrics[f"acc_{qtype}"] = value
    if train is not None:
        rare = rare_answers(train)
        is_rare = torch.tensor([(q.qtype, normalize_answer(q.answer)) in rare for q in split.records])
        if is_rare.any():
            metrics["acc_rare_answers"] = 100.0 * float(correct[is_rare].float().mean())
        if (~is_rare).any():
            metrics["acc_common_answers"] = 100.0 * float(correct[~is_rare].float().mean())
    # Per concept-frequency bucket, over the questions about a concept (count clips have none).
    with_bucket = [i for i, q in enumerate(split.records) if q.meta.get("bucket") is not None]
    if with_bucket:
        buckets = [split.records[i].meta["bucket"] for i in with_bucket]
        for bucket, value in accuracy_by_type(correct[torch.tensor(with_bucket)], buckets).items():
            metrics[f"acc_{bucket}"] = value
    return metrics


def task_vocab(task: QATask) -> AnswerVocab:
    return task.vocab  # type: ignore[no-any-return]


def majority_baseline(train: QASplit, split: QASplit) -> float:
    """Accuracy (percent) of always answering the most frequent training answer of each question type."""
    by_type: dict[str, Counter[str]] = {}
    for q in train.records:
        by_type.setdefault(q.qtype, Counter())[normalize_answer(q.answer)] += 1
    hits = sum(
        1 for q in split.records if q.qtype in by_type and by_type[q.qtype].most_common(1)[0][0] == normalize_answer(q.answer)
    )
    return 100.0 * hits / max(1, len(split))


@dataclass
class QAResult:
    out_dir: Path
    metrics: dict[str, float]
    wall_s: float
    step_ms: float
    history: list[dict[str, Any]]


def train_qa(cfg: Config, data: QAData | None = None, progress: bool | None = None) -> QAResult:
    """Train open-ended or multiple-choice QA on ``cfg`` (single process) and evaluate on ``cfg.eval.split``."""
    tc = cfg.train
    progress = tc.progress if progress is None else progress
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    out_dir = Path(tc.out_dir)
    if (out_dir / "checkpoints").exists() and not tc.overwrite:
        raise ConfigError(f"{out_dir} already holds a run; choose another train.out_dir or set train.overwrite=true")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    splits = ("train", "meta", "val", "test") if cfg.meta.enabled else ("train", "val", "test")
    if cfg.eval.split not in splits:
        splits = (*splits, cfg.eval.split)
    data = data or load_qa_data(cfg, splits, progress=progress)
    data.vocab.save(out_dir / "answers.json")
    train_set = data.splits["train"]

    device = torch.device("cuda" if tc.device == "auto" and torch.cuda.is_available() else ("cpu" if tc.device == "auto" else tc.device))
    torch.manual_seed(tc.seed)
    model = VideoQAModel(create_model(cfg.model, data.tokenizer), cfg.qa)
    load_weights = get_spec(cfg.model.name).load_weights
    if load_weights is not None:
        load_weights(model.encoder, cfg.model)
    task = QATask(model, cfg.loss).to(device)
    task.vocab = data.vocab  # type: ignore[assignment]
    optimizer, scheduler = build_optimizer(cfg, task)  # type: ignore[arg-type]
    meta = MetaWeighting(cfg.meta, task) if cfg.meta.enabled else None
    if meta is not None:
        meta.wnet.to(device)
    meta_set = data.splits.get("meta")
    captions = bool(train_set.has_caption.any()) and cfg.qa.contrastive_weight > 0

    def to_device(batch: dict[str, Any], clips: ClipSet) -> dict[str, Any]:
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["video"] = clips.to_model_input(batch.pop("frames"))
        return batch

    n, bs = len(train_set), tc.batch_size
    if n < bs:
        raise ValueError(f"batch size {bs} exceeds the {n} training questions")
    log_path = out_dir / "log.jsonl"
    log_path.unlink(missing_ok=True)
    history, window, step_times = [], [], []
    t_start = time.perf_counter()
    for step in tqdm(range(tc.steps), desc=out_dir.name, unit="step", disable=not progress):
        t0 = time.perf_counter()
        task.train()
        epoch, position = divmod(step, n // bs)
        index = torch.randperm(n, generator=_generator(tc.seed, 0, epoch))[position * bs : (position + 1) * bs]
        g = _generator(tc.seed, 1, step)
        frame_index = segment_random_indices(train_set.clips.num_slots, cfg.data.num_frames, bs, g)
        batch = to_device(train_set.batch(index, frame_index, captions, g), train_set.clips)
        meta_batch = None
        if meta is not None and meta.is_meta_step(step):
            assert meta_set is not None
            mg = _generator(tc.seed, 2, step)
            m_index = torch.randperm(len(meta_set), generator=mg)[: cfg.meta.batch_size]
            m_frames = segment_random_indices(meta_set.clips.num_slots, cfg.data.num_frames, len(m_index), mg)
            meta_batch = to_device(meta_set.batch(m_index, m_frames, captions=False), meta_set.clips)
        exact = meta_batch is not None and cfg.meta.method == "exact"
        with meta_forward_context(exact), autocast(device, tc.precision):
            loss_per_sample = task(batch)["loss_per_sample"]
            if meta is not None:
                result = meta.step(
                    task, loss_per_sample, meta_batch, step,
                    train_forward=lambda params: functional_call(task, params, (batch,))["loss_per_sample"],
                )  # fmt: skip
                weights = result.weights.detach()
            else:
                weights = torch.full_like(loss_per_sample, 1.0 / len(loss_per_sample))
        optimizer.zero_grad(set_to_none=True)
        with meta_forward_context(exact):
            (weights * loss_per_sample).sum().backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(task.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        task.logit_scale.clamp_()
        step_times.append(time.perf_counter() - t0)
        window.append(float(loss_per_sample.detach().mean()))
        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            record: dict[str, Any] = {"step": done, "loss": statistics.fmean(window), "lr": scheduler.get_last_lr()[0]}
            if meta is not None:
                noisy = torch.tensor([train_set.records[i].meta.get("noise", "none") != "none" for i in index.tolist()])
                scaled = weights.float().cpu() * len(weights)
                if noisy.any() and (~noisy).any():
                    record["weight_noisy"], record["weight_clean"] = float(scaled[noisy].mean()), float(scaled[~noisy].mean())
            window = []
            history.append(record)
            with log_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
    wall_s = time.perf_counter() - t_start
    split = data.splits[cfg.eval.split]
    metrics = evaluate_qa(task, split, cfg, train=train_set)
    metrics["majority_baseline"] = majority_baseline(train_set, split)
    summary = {
        "split": cfg.eval.split, "steps": tc.steps, "wall_s": wall_s,
        "step_ms": 1000 * statistics.fmean(step_times) if step_times else math.nan,
        "dropped_oov_train_questions": train_set.dropped_oov, "skipped": data.skipped, **metrics,
    }  # fmt: skip
    tensors = {"task": task.state_dict(), **({"wnet": meta.wnet.state_dict()} if meta is not None else {})}
    save_checkpoint(out_dir / "checkpoints", tc.steps, tensors, {"step": tc.steps, "config": to_dict(cfg), "optimizer": optimizer.state_dict()}, keep_last=1)
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    return QAResult(out_dir, metrics, wall_s, summary["step_ms"], history)
