"""Gradient accumulation, gradient checkpointing, mixed precision and crash-resume of the engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from mama.checkpoint import load_checkpoint
from mama.config import ConfigError, load_config, save_config
from mama.tasks import train
from test_distributed import assert_weighting_net_moved
from test_engine import _assert_same_tensors

Overrides = Callable[[Any, Any], list[str]]
# Well-conditioned AdamW (see tests/test_distributed.py): summation-order noise stays at float level.
STABLE = ["optim.eps=1.0", "optim.lr=0.05", "meta.optimizer=sgd", "train.threads=1"]
MAMA = ["meta.enabled=true", "loss.margin=0.05"]
ACTIVE_META = [*MAMA, "meta.zero_init=false", "meta.lr=1.0", "meta.interval=1"]  # see tests/test_distributed.py


def _tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(run_dir / "checkpoints")
    return {f"{group}.{k}": v for group, tensors in ckpt.tensors.items() for k, v in tensors.items()}


def _max_diff(a: Path, b: Path) -> float:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    return max((ta[k].double() - tb[k].double()).abs().max().item() for k in ta)


def kill_training_at(config: Path, checkpoint: Path, timeout: float = 120) -> int:
    """Start `mama train --config config` in a subprocess (one thread) and SIGKILL it as soon as the
    ``checkpoint`` folder exists: no chance to clean up, as in a crash. Returns its exit code."""
    cmd = [sys.executable, "-m", "mama.cli", "train", "--config", str(config)]
    proc = subprocess.Popen(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + timeout
        while not checkpoint.exists():
            assert proc.poll() is None, (
                f"training exited early: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}"
            )
            assert time.monotonic() < deadline, f"no checkpoint within {timeout} s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode


def _run(tiny_synthvl: Path, tiny_overrides: Overrides, out: Path, *extra: str) -> Any:
    return train(load_config(None, [*tiny_overrides(tiny_synthvl, out), *extra]))


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param([], id="plain"),
        pytest.param(ACTIVE_META, id="meta-exact"),
        pytest.param([*ACTIVE_META, "meta.method=first_order"], id="meta-first-order"),
    ],
)
def test_accumulation_equals_one_large_batch(
    variant: list[str], tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path: Path
) -> None:
    """4 micro-batches of 4 with cached embeddings give the update of one batch of 16: every loss
    still sees all 16 samples as negatives, and the weights come from the whole batch."""
    _run(tiny_synthvl, tiny_overrides, tmp_path / "big", *STABLE, *variant, "train.checkpoint_every=3")
    _run(tiny_synthvl, tiny_overrides, tmp_path / "micro", *STABLE, *variant, "train.accum_steps=4")
    assert _max_diff(tmp_path / "big", tmp_path / "micro") < 1e-5
    if variant:
        assert_weighting_net_moved(tmp_path / "big")
    # Not a vacuous comparison: the model moved away from its initialisation.
    first = load_config(None, [*tiny_overrides(tiny_synthvl, tmp_path / "short"), *STABLE, *variant, "train.steps=1"])
    train(first)
    assert _max_diff(tmp_path / "big", tmp_path / "short") > 1e-3


def test_gradient_checkpointing_changes_nothing_but_memory(
    tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path: Path
) -> None:
    _run(tiny_synthvl, tiny_overrides, tmp_path / "stored", *MAMA)
    _run(tiny_synthvl, tiny_overrides, tmp_path / "recomputed", *MAMA, "model.grad_checkpointing=true")
    assert _max_diff(tmp_path / "stored", tmp_path / "recomputed") == 0.0


@pytest.mark.parametrize("method", ["exact", "first_order"])
def test_bf16_autocast_trains_on_cpu(
    method: str, tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path: Path
) -> None:
    fp32 = _run(tiny_synthvl, tiny_overrides, tmp_path / "fp32", *MAMA, f"meta.method={method}")
    bf16 = _run(tiny_synthvl, tiny_overrides, tmp_path / "bf16", *MAMA, f"meta.method={method}", "train.precision=bf16")
    losses = [r["loss"] for r in bf16.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    # bf16 keeps about 3 significant digits; the angular loss itself runs in fp32.
    assert losses[-1] == pytest.approx(fp32.history[-1]["loss"], rel=0.05)
    assert all(r["meta_loss"] is not None and r["meta_loss"] == r["meta_loss"] for r in bf16.history)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with a gradient scaler needs CUDA")
def test_fp16_with_gradient_scaler_on_cuda(tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path: Path) -> None:
    result = _run(tiny_synthvl, tiny_overrides, tmp_path / "fp16", *MAMA, "train.precision=fp16", "train.device=cuda")
    assert all("grad_scale" in r and r["grad_scale"] > 0 for r in result.history)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    assert "scaler" in load_checkpoint(tmp_path / "fp16" / "checkpoints").state


@pytest.mark.parametrize(
    ("overrides", "match"), [(["train.accum_steps=3"], "divisible"), (["train.accum_steps=0"], ">= 1")]
)
def test_batch_that_does_not_split_is_a_config_error(
    overrides: list[str], match: str, tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=match):
        _run(tiny_synthvl, tiny_overrides, tmp_path / "bad", *overrides)


def test_killed_run_resumes_to_the_same_weights(tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path: Path) -> None:
    """SIGKILL a training process mid-epoch (no chance to clean up), resume it: the final weights,
    optimiser and weighting net are bitwise those of an uninterrupted run, and no log step is lost
    or repeated."""
    extra = [*MAMA, "train.threads=1", "train.steps=40", "train.checkpoint_every=4", "train.keep_last=3"]
    reference = tmp_path / "reference"
    _run(tiny_synthvl, tiny_overrides, reference, *extra)

    killed = tmp_path / "killed"
    cfg = load_config(None, [*tiny_overrides(tiny_synthvl, killed), *extra])
    save_config(cfg, tmp_path / "killed.yaml")
    assert kill_training_at(tmp_path / "killed.yaml", killed / "checkpoints" / "step_00000012") == -signal.SIGKILL
    assert not (killed / "metrics.json").exists()

    resumed = train(cfg, resume=True)
    # Resumed from step 12, or from step 8 when the kill landed between step 12's folder appearing and
    # the `latest` pointer naming it (the pointer wins, by design: see find_latest_checkpoint).
    assert 0 < resumed.steps_run <= 40 - 8, "the kill came too late to test a mid-run resume"
    ta, tb = _tensors(reference), _tensors(killed)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    state_a, state_b = load_checkpoint(reference / "checkpoints").state, load_checkpoint(killed / "checkpoints").state
    for part in ("optimizer", "meta_optimizer", "scheduler"):
        _assert_same_tensors(state_a[part], state_b[part], part)
    lines = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(2, 41, 2))
    assert [r["epoch"] for r in lines if "epoch" in r] == [1, 2, 3, 4, 5]  # 7 steps per epoch: one summary each
