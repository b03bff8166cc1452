"""Video QA through the one training engine: the same guarantees as retrieval.

2 gloo processes equal 1 process on the same global batch (plain and exact meta step, with a weighting
net that moves), gradient accumulation equals one batch, a run killed with SIGKILL resumes bit for bit,
and `mama eval` / `mama export` / `mama embed` work on a QA run.
"""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from mama.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mama.cli import main
from mama.config import load_config, save_config
from mama.tasks import create_task, load_run, train
from test_distributed import ACTIVE_META, STABLE, _assert_close_runs, _torchrun, assert_weighting_net_moved
from test_engine import _assert_same_tensors
from test_train_scaling import kill_training_at

Overrides = Callable[[Any, Any], list[str]]
RECIPE = str(Path(__file__).resolve().parents[2] / "configs" / "synthvl_qa.yaml")
TINY_QA = ["qa.fusion_width=32", "qa.fusion_heads=2", "qa.fusion_layers=1", "meta.batch_size=16", "train.log_every=2"]


def _cfg(root: Path, overrides: Overrides, out: Path, *extra: str) -> Any:
    return load_config(RECIPE, [*overrides(root, out), *TINY_QA, *extra])


@pytest.mark.distributed
@pytest.mark.parametrize(
    "variant", [pytest.param(["meta.enabled=false"], id="plain"), pytest.param(ACTIVE_META, id="meta-exact")]
)
def test_two_process_qa_equals_one_process(
    variant: list[str], tiny_qa_data: Path, tiny_overrides: Overrides, tmp_path: Path
) -> None:
    """The contrastive term's negatives span both ranks and the meta step is global, so 2 ranks of 8
    rows train what 1 process trains on the 16 rows."""
    common = [*STABLE, *variant, "train.checkpoint_every=3"]
    result = train(_cfg(tiny_qa_data, tiny_overrides, tmp_path / "one", *common))
    two_dir = tmp_path / "two"
    _torchrun(
        ["-m", "mama.cli", "train", "--config", RECIPE, *tiny_overrides(tiny_qa_data, two_dir), *TINY_QA, *common],
        tmp_path,
    )
    _assert_close_runs(tmp_path / "one", two_dir, atol=1e-5)
    if "meta.enabled=true" in variant:
        assert_weighting_net_moved(tmp_path / "one")
    two_metrics = json.loads((two_dir / "metrics.json").read_text())
    assert two_metrics["world_size"] == 2 and two_metrics["num_questions"] == result.metrics["num_questions"]
    one_question = 100 / result.metrics["num_questions"]  # parameters equal to 1e-5 may still flip a near-tie
    assert two_metrics["accuracy"] == pytest.approx(result.metrics["accuracy"], abs=one_question + 1e-6)


@pytest.mark.distributed
def test_qa_meta_batch_larger_than_the_meta_split_is_refused_on_several_ranks(
    tiny_qa_data: Path, tiny_overrides: Overrides, tmp_path: Path
) -> None:
    """One rank would get every meta question and the other none: refuse, naming the setting."""
    args = ["-m", "mama.cli", "train", "--config", RECIPE, *tiny_overrides(tiny_qa_data, tmp_path / "run"), *TINY_QA]
    done = _torchrun([*args, "meta.batch_size=100000"], tmp_path, expect_ok=False)
    assert done.returncode != 0
    assert "meta.batch_size (100000) exceeds the" in done.stderr and "meta questions" in done.stderr


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param([], id="plain"),
        pytest.param(ACTIVE_META, id="meta-exact"),
        pytest.param([*ACTIVE_META, "meta.method=first_order", "meta.interval=2"], id="meta-first-order-every-2"),
    ],
)
def test_qa_accumulation_equals_one_batch(
    variant: list[str], tiny_qa_data: Path, tiny_overrides: Overrides, tmp_path: Path
) -> None:
    """4 micro-batches of 4 with cached answer losses and embeddings update like one batch of 16."""
    train(_cfg(tiny_qa_data, tiny_overrides, tmp_path / "big", *STABLE, *variant, "train.checkpoint_every=3"))
    train(_cfg(tiny_qa_data, tiny_overrides, tmp_path / "micro", *STABLE, *variant, "train.accum_steps=4"))
    _assert_close_runs(tmp_path / "big", tmp_path / "micro", atol=1e-5)
    if variant:
        assert_weighting_net_moved(tmp_path / "big")
    # Not vacuous: the captions' contrastive term is on, and training moved the model.
    task = create_task(_cfg(tiny_qa_data, tiny_overrides, tmp_path / "unused"))
    task.load_data(("train",), progress=False)
    assert task.captions
    train(_cfg(tiny_qa_data, tiny_overrides, tmp_path / "short", *STABLE, *variant, "train.steps=1"))
    with pytest.raises(AssertionError):
        _assert_close_runs(tmp_path / "big", tmp_path / "short", atol=1e-3)


def test_qa_gradient_checkpointing_changes_nothing(
    tiny_qa_data: Path, tiny_overrides: Overrides, tmp_path: Path
) -> None:
    train(_cfg(tiny_qa_data, tiny_overrides, tmp_path / "plain", *ACTIVE_META))
    train(_cfg(tiny_qa_data, tiny_overrides, tmp_path / "ckpt", *ACTIVE_META, "model.grad_checkpointing=true"))
    _assert_close_runs(tmp_path / "plain", tmp_path / "ckpt", atol=0.0)


def test_qa_trains_in_bf16(tiny_qa_data: Path, tiny_overrides: Overrides, tmp_path: Path) -> None:
    """bf16 autocast on CPU with the exact meta step: losses, meta losses and weights stay finite."""
    result = train(_cfg(tiny_qa_data, tiny_overrides, tmp_path / "run", *ACTIVE_META, "train.precision=bf16"))
    for record in result.history:
        assert all(torch.isfinite(torch.tensor(record[k])) for k in ("loss", "meta_loss")), record
    assert torch.isfinite(torch.tensor(result.metrics["accuracy"]))


@pytest.mark.slow
def test_killed_qa_run_resumes_to_the_same_state(tiny_qa_data: Path, tiny_overrides: Overrides, tmp_path: Path) -> None:
    """SIGKILL mid-run, `--resume`: weights, both optimisers and the schedule end bitwise as in an
    uninterrupted run, and the log has every step once."""
    extra = ["train.threads=1", "train.steps=30", "train.checkpoint_every=4", "train.keep_last=3"]
    reference = tmp_path / "reference"
    train(_cfg(tiny_qa_data, tiny_overrides, reference, *extra))
    killed = tmp_path / "killed"
    cfg = _cfg(tiny_qa_data, tiny_overrides, killed, *extra)
    save_config(cfg, tmp_path / "killed.yaml")
    assert kill_training_at(tmp_path / "killed.yaml", killed / "checkpoints" / "step_00000008") == -signal.SIGKILL
    assert not (killed / "metrics.json").exists()

    assert main(["train", "--config", str(tmp_path / "killed.yaml"), "--resume"]) == 0
    a, b = load_checkpoint(reference / "checkpoints"), load_checkpoint(killed / "checkpoints")
    _assert_same_tensors(a.tensors, b.tensors, "tensors")
    for part in ("optimizer", "meta_optimizer", "scheduler"):
        _assert_same_tensors(a.state[part], b.state[part], part)
    steps = [json.loads(line)["step"] for line in (killed / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(2, 31, 2))
    assert (
        json.loads((killed / "metrics.json").read_text())["accuracy"]
        == json.loads((reference / "metrics.json").read_text())["accuracy"]
    )


def test_a_qa_checkpoint_without_engine_state_is_refused_clearly(
    tiny_qa_data: Path, tiny_overrides: Overrides, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint as the single-process QA loop wrote it (weights, optimiser and config only)."""
    run = tmp_path / "run"
    cfg = _cfg(tiny_qa_data, tiny_overrides, run, "train.steps=2")
    train(cfg)
    ckpt = load_checkpoint(run / "checkpoints")
    shutil.rmtree(run / "checkpoints")
    old_state = {"step": 2, "config": ckpt.state["config"], "optimizer": ckpt.state["optimizer"]}
    save_checkpoint(run / "checkpoints", 2, {"task": ckpt.tensors["task"]}, old_state, keep_last=1)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--no-progress"]) == 2
    assert "names no saved tokenizer" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="holds no scheduler, rng state"):
        train(cfg, resume=True)


@pytest.mark.slow
def test_eval_export_and_embed_of_a_qa_run(
    tiny_qa_data: Path, tiny_overrides: Overrides, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    train(_cfg(tiny_qa_data, tiny_overrides, run, "train.steps=4"))
    capsys.readouterr()
    # `mama eval` reproduces the final evaluation of the run it loads.
    assert main(["eval", "--checkpoint", str(run), "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    saved = json.loads((run / "metrics.json").read_text())
    assert evaluated["accuracy"] == saved["accuracy"] and evaluated["num_questions"] == saved["num_questions"]
    assert main(["eval", "--checkpoint", str(run), "--split", "val", "--no-progress"]) == 0
    assert "accuracy" in json.loads(capsys.readouterr().out)

    # `mama export` writes the QA model's video-text encoder; `mama embed` / `search` use it.
    model = tmp_path / "model"
    assert main(["export", "--checkpoint", str(run), "--out", str(model)]) == 0
    assert json.loads((model / "config.json").read_text())["task"] == "qa"
    trained = load_run(run)
    exported = load_run(run).encoder
    assert (
        main(
            [
                "embed",
                "--model",
                str(model),
                "--annotations",
                str(tiny_qa_data / "test.jsonl"),
                "--out",
                str(tmp_path / "index"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert main(["search", "a red circle", "--index", str(tmp_path / "index"), "--top-k", "3", "--json"]) == 0
    capsys.readouterr()
    from mama.inference.embed import Encoder

    encoder = Encoder.from_pretrained(model)
    ids, mask = trained.task.tokenizer(["a red circle moves left"])
    torch.testing.assert_close(
        encoder.encode_texts(["a red circle moves left"]), exported.encode_text(ids, mask).detach(), atol=1e-6, rtol=0
    )
