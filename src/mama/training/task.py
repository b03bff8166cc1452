"""What the training engine needs from a task (retrieval, video QA, ...): the :class:`Task` protocol.

The engine (:mod:`mama.training.trainer`) owns the run: folder, distributed setup, optimisers, the
meta-weighted step, logging, checkpoints and resume. A task owns everything specific to it: its data
and assets (tokenizer, answer vocabulary), the module whose ``forward`` returns per-sample losses, the
batches of a step, its evaluation and the statistics it logs. Adding a task means implementing this
protocol and registering it in :mod:`mama.tasks` (see docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

Batch = dict[str, Any]
# step -> (this rank's training batch, its meta batch or None): a picklable pure function of the step,
# so data-loading workers can build batches ahead of the loop without changing them.
StepBatches = Callable[[int], tuple[Batch, Batch | None]]


class BatchCache(Protocol):
    """Gradient-free results of a whole (rank) batch, for gradient accumulation; ``at(rows)`` marks the
    rows of the micro-batch that is re-encoded with gradient next."""

    def at(self, rows: slice) -> BatchCache: ...


class TaskModule(Protocol):
    """The trainable module of a task (model plus loss parameters such as the logit scale).

    ``module(batch)["loss_per_sample"]`` (n,) are this rank's per-sample losses (against the global batch
    where the loss couples samples). With ``cache`` (accumulation), ``batch`` is one micro-batch and the
    losses cover every row of the cached batch, differentiable only through the micro-batch, so the
    gradients of all micro-batches sum to the whole batch's.
    """

    def __call__(self, batch: Mapping[str, Any], cache: Any = None) -> dict[str, Tensor]: ...
    def cache_batch(self, micro_batches: Sequence[Mapping[str, Any]]) -> BatchCache: ...
    def cached_loss(self, cache: Any) -> Tensor: ...
    def after_optimizer_step(self) -> None: ...


class Task(Protocol):
    """A task as the engine sees it. ``load_data`` comes first; the other methods use its data."""

    name: str
    data: Any  # what load_data loaded (None before); several runs may share it (the demos do)

    def training_splits(self, meta: bool) -> tuple[str, ...]:
        """The splits a training run loads (``meta``: the meta split for the weighting net too)."""
        ...

    def load_data(self, splits: Sequence[str], progress: bool) -> None: ...

    def save_assets(self, out_dir: Path) -> None:
        """Write what rebuilding the model needs besides weights (tokenizer, answers) into the run folder."""
        ...

    def build_module(self, pretrained: bool) -> nn.Module:
        """A fresh task module (seeded); ``pretrained`` loads the backbone's pretrained weights."""
        ...

    @property
    def find_unused_parameters(self) -> bool:
        """Whether some parameters get no gradient in a step (DDP must then look for them)."""
        ...

    def steps_per_epoch(self, batch_size: int) -> int: ...

    def data_position(self, step: int) -> dict[str, Any] | None:
        """Where a streamed training set (shards) stands after ``step`` steps, recorded in checkpoints and
        checked on resume; None for random-access data, whose batches need no position."""
        ...

    def step_batches(self, rows: range, meta_rows: range) -> StepBatches: ...

    def to_device(self, batch: Batch, device: torch.device, meta: bool) -> tuple[Batch, Tensor]:
        """The model batch on ``device`` and (n, k) integer sample ids of its rows, for logging."""
        ...

    def step_stats(self, sample_ids: Tensor, weights: Tensor) -> dict[str, Any]:
        """Extra log fields of the global batch: ``sample_ids`` (N, k), ``weights`` (N,) scaled so 1.0
        is the uniform weight."""
        ...

    def weight_record(self, sample_ids: Tensor) -> dict[str, Any]:
        """Per-sample descriptions (ids, caption source, noise kind) for ``weights.jsonl``."""
        ...

    def merge_failures(self) -> dict[str, int]:
        """Share the mid-run decode failures of every rank (a collective: every rank calls it at the same
        step) and return the skipped count of each loaded split."""
        ...

    def evaluate(self, module: nn.Module, split: str) -> dict[str, float]:
        """Metrics of ``split`` (a collective under several processes; every rank gets the result)."""
        ...

    def final_metrics(self, module: nn.Module, split: str) -> dict[str, float]:
        """The end-of-training evaluation: :meth:`evaluate` plus any baselines the task reports."""
        ...
