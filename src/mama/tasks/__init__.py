"""Tasks on top of the training engine: text-video retrieval and video question answering.

task = create_task(cfg)                # by cfg.task
result = train(cfg)                    # the engine on that task (torchrun: every process)
run = load_run("runs/x")               # a trained run: config, task, module with weights
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mama.checkpoint import CheckpointError, load_checkpoint
from mama.config import Config, Split, from_dict
from mama.tasks.qa import VideoQA
from mama.tasks.retrieval import Retrieval
from mama.tasks.retrieval.data import SPLITS
from mama.training.loggers import read_log
from mama.training.trainer import TrainResult, run
from mama.weighting import MetaWeighting

TASKS: dict[str, type[Retrieval] | type[VideoQA]] = {"retrieval": Retrieval, "qa": VideoQA}


def create_task(cfg: Config, data: Any = None) -> Retrieval | VideoQA:
    """The task named by ``cfg.task``; ``data`` (that task's loaded data) is shared instead of loaded."""
    return TASKS[cfg.task](cfg, data)


def train(cfg: Config, data: Any = None, resume: bool = False, max_steps: int | None = None) -> TrainResult:
    """Train ``cfg`` (see :func:`mama.training.trainer.run`); ``data``: already loaded task data."""
    return run(cfg, create_task(cfg, data), resume=resume, max_steps=max_steps)


@dataclass
class TrainedRun:
    """A trained run loaded for evaluation or export; ``module`` is in eval mode."""

    cfg: Config
    task: Retrieval | VideoQA
    module: nn.Module
    meta: MetaWeighting | None
    path: Path  # the checkpoint folder

    @property
    def encoder(self) -> nn.Module:
        """The video-text model (``encode_video`` / ``encode_text``) inside the task module."""
        return self.task.encoder(self.module)


def load_run(path: str | Path) -> TrainedRun:
    """Load a run folder (its newest valid checkpoint) or one checkpoint folder, of any task."""
    path = Path(path)
    ckpt = load_checkpoint(path / "checkpoints" if (path / "checkpoints").is_dir() else path)
    cfg = from_dict(Config, ckpt.state["config"])
    if "tokenizer_dir" not in ckpt.state:
        raise CheckpointError(
            f"{ckpt.path}: names no saved tokenizer (video QA runs written before QA trained on the common "
            "engine did not keep one), so its model cannot be rebuilt; train it again"
        )
    task = create_task(cfg)
    task.restore_assets(ckpt.path.parent.parent, ckpt.state)
    module = task.build_module(pretrained=False)
    module.load_state_dict(ckpt.tensors["task"])
    module.eval()
    meta = None
    if "wnet" in ckpt.tensors:
        meta = MetaWeighting(cfg.meta, module)
        meta.wnet.load_state_dict(ckpt.tensors["wnet"])
    return TrainedRun(cfg, task, module, meta, ckpt.path)


def evaluate_run(path: str | Path, split: Split | None = None, progress: bool = True) -> dict[str, float]:
    """Evaluate a trained run (or one checkpoint) on ``split`` (default: its config's eval split)."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    trained = load_run(path)
    split = split or trained.cfg.eval.split
    trained.task.load_data((split,), progress=progress)
    return trained.task.evaluate(trained.module, split)


__all__ = ["TASKS", "TrainedRun", "WeightCurve", "create_task", "evaluate_run", "load_run", "train", "weight_curve"]


@dataclass
class WeightCurve:
    """The learned loss -> weight map of a meta-weighted run, for plots.

    ``loss`` (P,) per-sample losses from 0 to a little past the largest late-training loss, ``weight``
    (P,) the weighting net's output there (before normalisation over a batch), ``late_loss_by_noise``
    the per-sample losses of the last logged batches grouped by caption noise kind (``weights.jsonl``).
    """

    loss: Tensor
    weight: Tensor
    late_loss_by_noise: dict[str, list[float]]


def weight_curve(run_dir: str | Path, late_batches: int = 10, points: int = 200) -> WeightCurve | None:
    """The :class:`WeightCurve` of a run folder (its newest valid checkpoint's weighting net and the last
    ``late_batches`` records of its ``weights.jsonl``); None for a run trained without one. A line of the
    log cut short by a crash, or being written now, is skipped."""
    run_dir = Path(run_dir)
    meta = load_run(run_dir).meta
    if meta is None:
        return None
    records = read_log(run_dir / "weights.jsonl")
    by_noise: dict[str, list[float]] = {}
    for record in records[-late_batches:]:
        for noise, loss in zip(record.get("noise", []), record.get("loss", []), strict=False):
            by_noise.setdefault(str(noise), []).append(float(loss))
    max_loss = max((max(v) for v in by_noise.values() if v), default=10.0)
    losses = torch.linspace(0, max_loss * 1.05, points)  # (P,)
    with torch.no_grad():
        weights = meta.wnet(losses).reshape(-1)  # (P,)
    return WeightCurve(losses, weights, dict(sorted(by_noise.items())))
