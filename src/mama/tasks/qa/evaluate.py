"""Video QA evaluation: top-1 accuracy over every question (out-of-vocabulary answers and questions whose
video could not be decoded count wrong), per question type, per concept bucket, for rare answers and for
systematically mislabelled kinds of question, and the majority-answer baseline."""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

from mama.config import Config
from mama.data.sampling import uniform_indices
from mama.distributed import gather_rows, shard_range
from mama.metrics.qa import AnswerVocab, accuracy_by_type, mc_correct, normalize_answer, open_correct
from mama.precision import autocast
from mama.tasks.qa.data import QASplit
from mama.tasks.qa.module import QAModule


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
def evaluate_qa(
    module: QAModule, split: QASplit, cfg: Config, vocab: AnswerVocab, train: QASplit | None = None
) -> dict[str, float]:
    """Top-1 accuracy (percent) over every question of the split, per question type, per concept bucket
    when the questions carry one, on the questions marked ``confusable`` (their kind of question is
    systematically mislabelled in training: ``acc_confusable``) and the rest, and (given ``train``) on
    questions whose answer is rare in training (``acc_rare_answers``) or not. The questions whose video could not be decoded (``split.lost``) count
    as wrong in every one of these accuracies, not only the overall one. Under several processes the
    questions are scored in shares and gathered; every rank returns the metrics."""
    scores = question_scores(module, split, cfg)
    if cfg.qa.answer_format == "mc":
        correct = mc_correct(scores, split.answer)
    else:
        correct = open_correct(scores.argmax(1), [q.answer for q in split.records], vocab)
    records = [*split.records, *split.lost]
    correct = torch.cat([correct, torch.zeros(len(split.lost), dtype=torch.bool)])  # (Q + lost,)
    metrics = {"accuracy": 100.0 * float(correct.sum()) / len(records), "num_questions": float(len(records))}
    for qtype, value in accuracy_by_type(correct, [q.qtype or "all" for q in records]).items():
        metrics[f"acc_{qtype}"] = value
    if train is not None:
        rare = rare_answers(train)
        is_rare = torch.tensor([(q.qtype, normalize_answer(q.answer)) in rare for q in records])
        if is_rare.any():
            metrics["acc_rare_answers"] = 100.0 * float(correct[is_rare].float().mean())
        if (~is_rare).any():
            metrics["acc_common_answers"] = 100.0 * float(correct[~is_rare].float().mean())
    # Questions whose kind the training answers get systematically wrong (SynthVL QA's noise model marks
    # them "confusable"), against the rest.
    confusable = torch.tensor([bool(q.meta.get("confusable", False)) for q in records])
    if confusable.any() and (~confusable).any():
        metrics["acc_confusable"] = 100.0 * float(correct[confusable].float().mean())
        metrics["acc_not_confusable"] = 100.0 * float(correct[~confusable].float().mean())
    # Per concept-frequency bucket, over the questions about a concept (count clips have none).
    with_bucket = [i for i, q in enumerate(records) if q.meta.get("bucket") is not None]
    if with_bucket:
        buckets = [records[i].meta["bucket"] for i in with_bucket]
        for bucket, value in accuracy_by_type(correct[torch.tensor(with_bucket)], buckets).items():
            metrics[f"acc_{bucket}"] = value
    return metrics


def majority_baseline(train: QASplit, split: QASplit) -> float:
    """Accuracy (percent) of always answering the most frequent training answer of each question type,
    over every question of ``split`` (this answer needs no video, so the lost questions count too)."""
    by_type: dict[str, Counter[str]] = {}
    for q in train.records:
        by_type.setdefault(q.qtype, Counter())[normalize_answer(q.answer)] += 1
    records = [*split.records, *split.lost]
    hits = sum(
        1 for q in records if q.qtype in by_type and by_type[q.qtype].most_common(1)[0][0] == normalize_answer(q.answer)
    )
    return 100.0 * hits / max(1, len(records))


@torch.no_grad()
def question_scores(module: QAModule, split: QASplit, cfg: Config) -> Tensor:
    """(Q, K) answer logits or (Q, C) candidate scores (padding candidates -inf) of every question, in
    order; each rank scores a contiguous share and the shares are gathered."""
    module.eval()
    model = module.model
    device = next(module.parameters()).device
    frame_index = uniform_indices(split.clips.num_slots, cfg.data.num_frames)
    share = shard_range(len(split))
    width = split.candidate_mask.shape[1] if split.candidate_mask is not None else model.cfg.num_answers
    preds = [torch.zeros(0, width)]  # a rank with an empty share still joins the gather
    for start in range(share.start, share.stop, cfg.eval.batch_size):
        index = torch.arange(start, min(start + cfg.eval.batch_size, share.stop))
        batch = split.batch(index, frame_index.expand(len(index), -1), captions=False)
        split.clips.note_failures(batch.pop("failed"))
        batch = {k: v.to(device) for k, v in batch.items()}
        video = split.clips.to_model_input(batch.pop("frames"))
        # The heads directly, not the task module: an evaluation answer may be outside the vocabulary.
        with autocast(device, cfg.train.precision):
            if cfg.qa.answer_format == "mc":
                scores = model.mc_scores(video, batch["input_ids"], batch["attention_mask"])
                scores = scores.float().masked_fill(~batch["candidate_mask"], float("-inf"))
            else:
                scores = model.open_logits(video, batch["input_ids"], batch["attention_mask"])
        preds.append(scores.float().cpu())
    return gather_rows(torch.cat(preds).to(device)).cpu()
