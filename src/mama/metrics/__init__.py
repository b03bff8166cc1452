"""Evaluation metrics: retrieval ranks and recalls (:mod:`mama.metrics.retrieval`) and video QA
accuracy with its answer vocabulary (:mod:`mama.metrics.qa`)."""

from mama.metrics.qa import AnswerVocab, accuracy_by_type, mc_correct, normalize_answer, open_correct
from mama.metrics.retrieval import bucket_recall, dsl_metrics, metrics_from_ranks, retrieval_ranks

__all__ = [
    "AnswerVocab",
    "accuracy_by_type",
    "bucket_recall",
    "dsl_metrics",
    "mc_correct",
    "metrics_from_ranks",
    "normalize_answer",
    "open_correct",
    "retrieval_ranks",
]
