"""Video question answering: the task module (fusion model + answer loss + auxiliary contrastive term),
its data, its evaluation, and the :class:`VideoQA` task the training engine runs."""

from mama.tasks.qa.data import QAData, QASplit, hold_out_questions, load_qa_data
from mama.tasks.qa.evaluate import evaluate_qa, majority_baseline, rare_answers
from mama.tasks.qa.module import QACache, QAModule
from mama.tasks.qa.task import VideoQA, build_qa_module

__all__ = [
    "QACache",
    "QAData",
    "QAModule",
    "QASplit",
    "VideoQA",
    "build_qa_module",
    "evaluate_qa",
    "hold_out_questions",
    "load_qa_data",
    "majority_baseline",
    "rare_answers",
]
