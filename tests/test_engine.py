"""End-to-end CPU tests of the engine, CLI and demo on a tiny SynthVL (each run takes about a second)."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import mama.tasks.retrieval.task as retrieval_task
from mama.checkpoint import load_checkpoint
from mama.cli import main
from mama.config import Config, ConfigError, load_config
from mama.demos.retrieval import METRIC_KEYS, VARIANT_NAMES, run_demo
from mama.tasks import evaluate_run, load_run, train
from mama.tasks.retrieval import encode_clipset, load_data
from mama.training.optim import lr_lambda

RETRIEVAL_KEYS = [k for k in METRIC_KEYS if k not in ("wall_s", "step_ms")]  # incl. head/mid/tail_t2v_r1
# The reference run: full MAMA (margin + meta weighting), so resume covers the WNet and its optimiser.
MAMA = ["meta.enabled=true", "loss.margin=0.05"]

Overrides = Callable[[Any, Any], list[str]]


def load_trained(path: Path) -> tuple[Config, Any, Any, Any]:
    run = load_run(path)
    return run.cfg, run.module, run.task.tokenizer, run.meta


def _log(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line]


def _assert_same_tensors(a: Any, b: Any, where: str = "") -> None:
    """Bitwise equality of two nested structures of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tensors(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def _final_state(run_dir: Path) -> dict[str, Any]:
    ckpt = load_checkpoint(run_dir / "checkpoints")
    assert ckpt.step == 6
    return {
        "tensors": ckpt.tensors,
        "optimizer": ckpt.state["optimizer"],
        "meta_optimizer": ckpt.state["meta_optimizer"],
    }


@pytest.fixture(scope="module")
def reference_run(
    tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """An uninterrupted 6-step MAMA run, plus the test-set embeddings of its in-memory final model."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    cfg = load_config(None, tiny_overrides(tiny_synthvl, run_dir) + MAMA + ["train.checkpoint_every=3"])
    captured: dict[str, Any] = {}
    real_evaluate = retrieval_task.evaluate

    def spy(task: Any, clips: Any, cfg: Config) -> dict[str, float]:
        # train() evaluates its in-memory model once at the end: record what that model encodes.
        captured["embeddings"] = encode_clipset(task, clips, cfg.data.num_frames, cfg.eval.batch_size)
        return real_evaluate(task, clips, cfg)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(retrieval_task, "evaluate", spy)
        result = train(cfg)
    return {"cfg": cfg, "dir": run_dir, "result": result, **captured}


def test_train_end_to_end_writes_run_folder(reference_run: dict[str, Any]) -> None:
    run_dir, cfg, result = reference_run["dir"], reference_run["cfg"], reference_run["result"]
    assert load_config(run_dir / "config.yaml") == cfg
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000006"]

    log = _log(run_dir)
    assert [r["step"] for r in log] == [2, 4, 6]
    for record in log:
        assert math.isfinite(record["loss"]) and record["loss"] > 0
        assert math.isfinite(record["meta_loss"])  # the mean over the window's meta steps (every 2nd step)
        assert set(record["weight_by_source"]) <= {"human", "lvlm"}
    assert log[-1]["lr"] < log[0]["lr"]  # cosine decay after the warm-up

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["steps"] == 6
    assert metrics["skipped_videos"] == {"train": 0, "meta": 0, "val": 0, "test": 0}
    for key in RETRIEVAL_KEYS:
        assert math.isfinite(metrics[key]), key
        assert metrics[key] == result.metrics[key], key
    assert 0 <= metrics["t2v_r1"] <= metrics["t2v_r5"] <= metrics["t2v_r10"] <= 100
    assert metrics["num_videos"] == 30 and metrics["num_queries"] == 60
    assert result.steps_run == 6 and result.step_ms > 0


def test_saved_model_encodes_exactly_like_trained_one(reference_run: dict[str, Any]) -> None:
    run_dir, cfg = reference_run["dir"], reference_run["cfg"]
    trained_video, trained_text = reference_run["embeddings"]
    loaded_cfg, task, tokenizer, meta = load_trained(run_dir)
    assert loaded_cfg == cfg and meta is not None
    test_set = load_data(loaded_cfg, ("test",), tokenizer=tokenizer, progress=False).splits["test"]
    video_emb, text_emb = encode_clipset(task, test_set, cfg.data.num_frames, cfg.eval.batch_size)
    assert torch.equal(video_emb, trained_video)
    assert torch.equal(text_emb, trained_text)

    # The checkpoint folder itself also loads, and evaluating it reproduces metrics.json exactly.
    _, again, _, _ = load_trained(run_dir / "checkpoints" / "step_00000006")
    _assert_same_tensors(again.state_dict(), task.state_dict())
    evaluated = evaluate_run(run_dir, progress=False)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert {k: saved[k] for k in evaluated} == evaluated


def test_resume_is_bitwise_identical(
    reference_run: dict[str, Any], tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path: Path
) -> None:
    run_dir = tmp_path / "resumed"
    cfg = load_config(None, tiny_overrides(tiny_synthvl, run_dir) + MAMA + ["train.checkpoint_every=3"])
    crashed = train(cfg, max_steps=3)  # stops after the step-3 checkpoint, as a crash would
    assert crashed.steps_run == 3 and crashed.metrics == {}
    assert not (run_dir / "metrics.json").exists()
    resumed = train(cfg, resume=True)
    assert resumed.steps_run == 3

    _assert_same_tensors(_final_state(run_dir), _final_state(reference_run["dir"]))
    assert resumed.metrics == reference_run["result"].metrics
    steps = [r["step"] for r in _log(run_dir)]
    assert steps == sorted(set(steps)), f"duplicate or unordered steps in log.jsonl: {steps}"
    # Step 6 averages the losses of steps 5 and 6 in both runs, so it must match exactly.
    assert _log(run_dir)[-1] == _log(reference_run["dir"])[-1] | {"step_ms": _log(run_dir)[-1]["step_ms"]}


def test_resume_skips_corrupt_newest_checkpoint(
    reference_run: dict[str, Any], tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path: Path
) -> None:
    run_dir = tmp_path / "corrupt"
    extra = ["train.checkpoint_every=2", "train.keep_last=3"]
    cfg = load_config(None, tiny_overrides(tiny_synthvl, run_dir) + MAMA + extra)
    train(cfg, max_steps=4)
    newest = run_dir / "checkpoints" / "step_00000004" / "task.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    with pytest.warns(UserWarning, match=r"skipping corrupt checkpoint: .*step_00000004.*truncated"):
        resumed = train(cfg, resume=True)
    assert resumed.steps_run == 4  # from step 2
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [
        "step_00000002", "step_00000004", "step_00000006",
    ]  # fmt: skip
    _assert_same_tensors(_final_state(run_dir), _final_state(reference_run["dir"]))
    assert [r["step"] for r in _log(run_dir)] == [2, 4, 6]


def test_bad_videos_are_skipped_and_counted(tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_synthvl, root, ignore=shutil.ignore_patterns(".cache"))
    videos = [json.loads(line)["video"] for line in (root / "train.jsonl").read_text().splitlines()]
    corrupt, missing = root / videos[0], root / videos[1]
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    missing.unlink()

    cfg = load_config(None, tiny_overrides(root, tmp_path / "run") + ["train.steps=2"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    messages = [str(w.message) for w in caught]
    for path in (corrupt, missing):
        assert any(f"skipping video {path}" in m for m in messages), (path, messages)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["skipped_videos"] == {"train": 2, "val": 0, "test": 0}


def test_fresh_run_refuses_to_replace_an_existing_run(
    tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(tiny_synthvl, run_dir) + ["train.steps=2"])
    train(cfg)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before  # nothing lost
    replaced = train(
        load_config(None, tiny_overrides(tiny_synthvl, run_dir) + ["train.steps=2", "train.overwrite=true"])
    )
    assert replaced.steps_run == 2
    # A replacement that stops early leaves no metrics.json of the run it replaced.
    assert (run_dir / "metrics.json").exists()
    overwrite = load_config(None, tiny_overrides(tiny_synthvl, run_dir) + ["train.steps=4", "train.overwrite=true"])
    train(overwrite, max_steps=1)
    assert not (run_dir / "metrics.json").exists()


def test_resume_refuses_a_changed_config(tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(load_config(None, tiny_overrides(tiny_synthvl, run_dir)), max_steps=2)
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    changed = load_config(None, tiny_overrides(tiny_synthvl, run_dir) + ["loss.margin=0.1"])
    with pytest.raises(ConfigError, match=r"loss\.margin: 0\.0 -> 0\.1"):
        train(changed, resume=True)
    # Refused before anything was written: the run folder (config.yaml, tokenizer, logs) is as it was.
    assert {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


# --- CLI --------------------------------------------------------------------------------------------


def test_cli_train_eval_and_bad_override(
    tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    overrides = [o for o in tiny_overrides(tiny_synthvl, run_dir) if not o.startswith("train.steps=")]
    # Some settings from a YAML file, the rest as dotted overrides.
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"train": {"steps": 2}, "loss": {"margin": 0.05}}))
    assert main(["train", "--config", str(config), *overrides]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["out_dir"] == str(run_dir)
    assert set(RETRIEVAL_KEYS) <= printed.keys()
    resolved = load_config(run_dir / "config.yaml")
    assert resolved.train.steps == 2 and resolved.loss.margin == 0.05 and resolved.model.width == 32
    assert [r["step"] for r in _log(run_dir)] == [2]

    assert main(["eval", "--checkpoint", str(run_dir), "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert {k: printed[k] for k in evaluated} == evaluated

    assert main(["train", "--config", str(config), *overrides, "model.widht=64"]) == 2
    captured = capsys.readouterr()
    assert "model.widht" in captured.err and captured.out == ""
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_synth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synth"
    assert main(["synth", "--out", str(out), "--scale", "0.05", "--no-progress"]) == 0
    assert str(out) in capsys.readouterr().out
    # Every split has at least 30 videos (one per concept); 5% of the 2000 train videos is 100.
    expected = {"train": 100, "meta": 30, "val": 30, "test": 30}
    for split, count in expected.items():
        assert len(list((out / "videos" / split).glob("*.mp4"))) == count, split
        assert len((out / f"{split}.jsonl").read_text().splitlines()) == count, split
    assert (out / "synthvl.json").is_file()


# --- demo -------------------------------------------------------------------------------------------


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    return data[:8] == b"\x89PNG\r\n\x1a\n" and width > 0 and height > 0


def test_quick_demo(tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    # QUICK points at data/synthvl_quick and 120 steps; the overrides come after it and win.
    overrides = [o for o in tiny_overrides(tiny_synthvl, out) if not o.startswith("train.out_dir=")]
    results = run_demo(out, quick=True, overrides=overrides, progress=False, regime="scratch")
    saved = json.loads((out / "results.json").read_text())
    assert saved["variants"].keys() == results["variants"].keys()
    assert set(saved["variants"]) == set(VARIANT_NAMES)
    for variant, metrics in saved["variants"].items():
        assert set(METRIC_KEYS) <= metrics.keys(), variant
        assert all(math.isfinite(metrics[k]) for k in METRIC_KEYS), variant
    assert saved["config"]["train"]["steps"] == 6 and saved["config"]["data"]["root"] == str(tiny_synthvl)
    assert _log(out / "mama_seed0")[-1]["step"] == 6
    for name in ("weight_curve.png", "buckets.png"):
        assert _is_png(out / name), name
    assert len(saved["weight_curve"]["weight"]) == 20


def test_demo_with_two_seeds_reports_spread(
    tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    overrides = [o for o in tiny_overrides(tiny_synthvl, out) if not o.startswith("train.out_dir=")] + ["train.steps=2"]
    assert main(["demo", "--out", str(out), "--seeds", "0,1", "--regime", "scratch", "--no-progress", *overrides]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["seeds"] == [0, 1] and len(saved["per_seed"]["mama"]) == 2
    assert "t2v_r1_std" in saved["variants"]["infonce"]
    assert len(saved["mama_weight_by_noise"]) == 2
    table = capsys.readouterr().out
    assert "±" in table and "MAMA mean weight by caption kind (seed 1" in table


# --- schedule ---------------------------------------------------------------------------------------


def test_lr_lambda_warmup_then_cosine() -> None:
    total = 100
    values = [lr_lambda(s, total, 0.1, "cosine") for s in range(total + 1)]
    assert values[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warm-up to 1
    assert values[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))  # then never increases
    assert values[55] == pytest.approx(0.5)  # half-way through the cosine
    assert values[total - 1] < 1e-3 and values[total] == pytest.approx(0.0, abs=1e-12)

    assert lr_lambda(0, total, 0.0, "cosine") == 1.0  # no warm-up
    assert lr_lambda(50, total, 0.1, "constant") == 1.0
    with pytest.raises(ConfigError, match="optim.schedule"):
        load_config(None, ["optim.schedule=linear"])


def test_demo_refuses_a_multi_process_launch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Under torchrun every rank would run the whole demo and write the same files.
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 2
    assert "mama.cli train --config configs/synthvl_mama.yaml" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_resume_accepts_a_checkpoint_written_before_new_config_keys() -> None:
    from mama.config import resume_changes, to_dict

    older = to_dict(Config())
    del older["data"]["format"], older["optim"]["backbone_lr"], older["eval"]["dsl"]  # keys added later
    assert resume_changes(older, Config()) == []
    worker_change = load_config(None, ["data.workers=4", "eval.dsl=true"])
    assert resume_changes(older, worker_change) == []  # where batches are built does not change them
    assert resume_changes(older, load_config(None, ["data.format=msrvtt"])) == ["data.format: 'jsonl' -> 'msrvtt'"]
