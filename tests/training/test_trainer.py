"""The engine's stages used one by one, its state round trip, and a second logger in a real run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from mama.config import load_config
from mama.distributed import init_distributed
from mama.tasks import create_task, train
from mama.training.trainer import Trainer
from test_engine import _assert_same_tensors

Overrides = Callable[[Any, Any], list[str]]
MAMA = ["meta.enabled=true", "loss.margin=0.05"]


def test_stages_one_by_one_and_state_round_trip(tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path: Path) -> None:
    cfg = load_config(None, [*tiny_overrides(tiny_synthvl, tmp_path / "run"), *MAMA])
    trainer = Trainer(cfg, create_task(cfg), init_distributed("cpu"))
    trainer.setup()
    batches = trainer.task.step_batches(range(16), range(16))
    out, sample_ids = trainer.train_step(0, *batches(0))
    assert out.meta_loss is not None and out.loss_per_sample.shape == out.weights.shape == (16,)
    assert float(out.weights.sum()) == pytest.approx(1.0) and sample_ids.shape == (16, 2)
    assert trainer.state.step == 1
    assert 0 <= trainer.evaluate("val")["t2v_r1"] <= 100

    path = trainer.save_checkpoint(1)
    tensors, state = trainer.state.state_dict()
    fresh = Trainer(cfg, create_task(cfg, data=trainer.task.data), init_distributed("cpu"))
    fresh.state, fresh.step_module = fresh._build_state(pretrained=False)
    fresh.load_checkpoint(path)
    again_tensors, again_state = fresh.state.state_dict()
    _assert_same_tensors(again_tensors, tensors)
    for part in ("optimizer", "scheduler", "meta_optimizer", "step"):
        _assert_same_tensors(again_state[part], state[part], part)
    assert fresh.start_step == 1
    trainer.cleanup()


def test_tensorboard_logger_in_a_run(tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    extra = [*MAMA, "train.loggers=[jsonl, tensorboard]", "train.eval_every=3", "train.checkpoint_every=3"]
    cfg = load_config(None, [*tiny_overrides(tiny_synthvl, run), *extra])
    train(cfg, max_steps=3)
    train(cfg, resume=True)  # the resumed half appends to the same event files without repeating a step
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/meta_loss", "train/weight_by_source/human", "val/t2v_r1"} <= tags
    # Step 3 ended the first half (a log line and a checkpoint), as in log.jsonl; no step twice.
    assert [e.step for e in events.Scalars("train/loss")] == [2, 3, 4, 6]
    assert [e.step for e in events.Scalars("val/t2v_r1")] == [3]
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    logged = {
        r["step"]: r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r
    }
    assert losses == pytest.approx(logged)
    assert torch.isfinite(torch.tensor(list(losses.values()))).all()
