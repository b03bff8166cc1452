"""Tasks on top of the training engine: text-video retrieval and video question answering.

task = create_task(cfg)                # by cfg.task
result = train(cfg)                    # the engine on that task (torchrun: every process)
run = load_run("runs/x")               # a trained run: config, task, module with weights
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mama.checkpoint import CheckpointError, load_checkpoint
from mama.config import Config, Split, from_dict
from mama.tasks.qa import VideoQA
from mama.tasks.retrieval import Retrieval
from mama.tasks.retrieval.data import SPLITS
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


__all__ = ["TASKS", "TrainedRun", "create_task", "evaluate_run", "load_run", "train"]
