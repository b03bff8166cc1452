"""Evaluation metrics: retrieval ranks and recalls (:mod:`mama.metrics.retrieval`) and video QA
accuracy with its answer vocabulary (:mod:`mama.metrics.qa`), and paired confidence intervals for
comparing variants over seeds (:mod:`mama.metrics.stats`)."""

from mama.metrics.qa import AnswerVocab, accuracy_by_type, mc_correct, normalize_answer, open_correct
from mama.metrics.retrieval import bucket_recall, dsl_metrics, metrics_from_ranks, retrieval_ranks
from mama.metrics.stats import PairedCI, paired_ci

__all__ = [
    "AnswerVocab",
    "PairedCI",
    "accuracy_by_type",
    "bucket_recall",
    "dsl_metrics",
    "mc_correct",
    "metrics_from_ranks",
    "normalize_answer",
    "open_correct",
    "paired_ci",
    "retrieval_ranks",
]
