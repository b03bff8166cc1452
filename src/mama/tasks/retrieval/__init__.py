"""Text-video retrieval: the task module (model + angular margin contrastive loss), its data, its
evaluation, and the :class:`Retrieval` task the training engine runs."""

from mama.tasks.retrieval.data import RunData, load_data
from mama.tasks.retrieval.evaluate import encode_clipset, evaluate
from mama.tasks.retrieval.module import EmbeddingCache, RetrievalModule
from mama.tasks.retrieval.task import Retrieval, build_retrieval_module

__all__ = [
    "EmbeddingCache",
    "Retrieval",
    "RetrievalModule",
    "RunData",
    "build_retrieval_module",
    "encode_clipset",
    "evaluate",
    "load_data",
]
