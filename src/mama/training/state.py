"""Everything a run updates, in one object with one ``state_dict``: the task module, its optimiser,
schedule and gradient scaler, the weighting net and its optimiser, the step and the RNG states.

The checkpoint layout (``mama.checkpoint``) is split into tensors (``task``, ``wnet``: safetensors) and a
JSON-ready state (``optimizer``, ``scheduler``, ``scaler``, ``meta_optimizer``, ``rng``, ``step``);
runs written before this module existed use the same names, so they resume unchanged.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from mama.weighting import MetaWeighting


def rng_state() -> dict[str, Any]:
    """The torch, Python and NumPy global RNG states, in a form the checkpoint can store."""
    # The global RandomState is an MT19937, whose state comes as the legacy tuple (the stub also allows a dict).
    np_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


@dataclass
class TrainState:
    """The mutable state of a run. ``step`` counts finished optimiser steps; batches are a pure
    function of (seed, step), so the step is also the data position and resume needs no sampler state."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    meta: MetaWeighting | None = None
    step: int = 0

    def state_dict(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """``(tensors, state)`` for :func:`mama.checkpoint.save_checkpoint`: everything a bitwise resume needs."""
        tensors = {"task": self.module.state_dict()}
        state: dict[str, Any] = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
        }
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        if self.meta is not None:
            meta_state = self.meta.state_dict()
            tensors["wnet"] = meta_state["wnet"]
            state["meta_optimizer"] = meta_state["optimizer"]
        return tensors, state

    def load_state_dict(self, tensors: dict[str, Any], state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` wrote, RNG states included."""
        self.module.load_state_dict(tensors["task"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if self.meta is not None:
            self.meta.load_state_dict({"wnet": tensors["wnet"], "optimizer": state["meta_optimizer"]})
        set_rng_state(state["rng"])
        self.step = int(state["step"])
