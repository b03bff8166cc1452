"""Run loggers: JSON-lines resume/fresh/disabled behaviour, TensorBoard tags and resume purge, the factory."""

from __future__ import annotations

import builtins
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest

from mama.training.loggers import (
    JsonlLogger,
    Logger,
    Loggers,
    TensorBoardLogger,
    build_loggers,
)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- JSON lines --------------------------------------------------------------------------------


def test_jsonl_appends_one_line_per_record(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    logger = JsonlLogger(path, resume_step=None)
    logger.log({"step": 1, "loss": 0.5, "weight_by_source": {"human": 1.02, "lvlm": 0.9}})
    logger.log({"step": 1, "split": "val", "t2v_r1": 12.5})
    logger.close()
    assert path.read_text() == (
        json.dumps({"step": 1, "loss": 0.5, "weight_by_source": {"human": 1.02, "lvlm": 0.9}})
        + "\n"
        + json.dumps({"step": 1, "split": "val", "t2v_r1": 12.5})
        + "\n"
    )


def test_jsonl_resume_drops_lines_after_the_step_and_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    lines = [
        json.dumps({"note": "no step counts as 0"}),
        json.dumps({"step": 1, "loss": 1.0}),
        json.dumps({"step": 2, "loss": 0.9}),
        json.dumps({"step": 2, "split": "val", "t2v_r1": 3.0}),
        json.dumps({"step": 3, "loss": 0.8}),
        json.dumps({"step": 4, "loss": 0.7}),
        '{"step": 4, "lo',  # cut short by a crash mid-write
    ]
    path.write_text("\n".join(lines) + "\n")
    logger = JsonlLogger(path, resume_step=2)
    assert _lines(path) == [
        {"note": "no step counts as 0"},
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 0.9},
        {"step": 2, "split": "val", "t2v_r1": 3.0},
    ]
    assert not path.with_suffix(".tmp").exists()
    logger.log({"step": 3, "loss": 0.75})
    assert _lines(path)[-1] == {"step": 3, "loss": 0.75}
    assert len(_lines(path)) == 5


def test_jsonl_resume_drops_a_torn_line_even_before_the_step(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n" + '{"ste\n')
    JsonlLogger(path, resume_step=10)
    assert _lines(path) == [{"step": 1}]


def test_jsonl_resume_without_a_file_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    JsonlLogger(path, resume_step=3)
    assert not path.exists()


def test_jsonl_fresh_run_deletes_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text(json.dumps({"step": 7, "loss": 1.0}) + "\n")
    logger = JsonlLogger(path, resume_step=None)
    assert not path.exists()
    logger.log({"step": 1, "loss": 2.0})
    assert _lines(path) == [{"step": 1, "loss": 2.0}]


@pytest.mark.parametrize("resume_step", [None, 1])
def test_jsonl_disabled_touches_nothing(tmp_path: Path, resume_step: int | None) -> None:
    path = tmp_path / "log.jsonl"
    old = json.dumps({"step": 5}) + "\n"
    path.write_text(old)
    logger = JsonlLogger(path, resume_step=resume_step, enabled=False)
    logger.log({"step": 6, "loss": 1.0})
    logger.close()
    assert path.read_text() == old
    missing = tmp_path / "other.jsonl"
    JsonlLogger(missing, resume_step=resume_step, enabled=False).log({"step": 1})
    assert not missing.exists()


# --- TensorBoard -------------------------------------------------------------------------------

# tensorboard is an optional extra: only the tests that write or read event files need it.
needs_tensorboard = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None, reason="needs the tensorboard package (mama[tensorboard])"
)


def _read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(event.step, event.value) for event in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@needs_tensorboard
def test_tensorboard_writes_train_and_eval_scalars(tmp_path: Path) -> None:
    log_dir = tmp_path / "tensorboard"
    logger = TensorBoardLogger(log_dir, resume_step=None)
    logger.log({"step": 1, "epoch": 0, "loss": 2.0, "lr": 1e-3, "weight_by_source": {"human": 1.25, "lvlm": 0.75}})
    logger.log(
        {
            "step": 2,
            "loss": 1.5,
            "skipped": None,
            "note": "text",
            "finite": True,
            "weight_by_source": {"human": 1.5, "lvlm": 0.5},
        }
    )
    logger.log({"step": 2, "split": "val", "t2v_r1": 12.5, "v2t_r1": 10.0})
    logger.log({"step": 3, "loss": math.inf})
    logger.close()

    scalars = _read_scalars(log_dir)
    assert set(scalars) == {
        "train/epoch",
        "train/loss",
        "train/lr",
        "train/weight_by_source/human",
        "train/weight_by_source/lvlm",
        "val/t2v_r1",
        "val/v2t_r1",
    }
    assert scalars["train/loss"] == [(1, 2.0), (2, 1.5), (3, math.inf)]
    assert scalars["train/weight_by_source/human"] == [(1, 1.25), (2, 1.5)]
    assert scalars["train/lr"] == [(1, pytest.approx(1e-3))]
    assert scalars["train/epoch"] == [(1, 0.0)]
    assert scalars["val/t2v_r1"] == [(2, 12.5)]
    assert scalars["val/v2t_r1"] == [(2, 10.0)]


@needs_tensorboard
def test_tensorboard_resume_leaves_one_value_per_step(tmp_path: Path) -> None:
    log_dir = tmp_path / "tensorboard"
    first = TensorBoardLogger(log_dir, resume_step=None)
    for step in range(1, 5):
        first.log({"step": step, "loss": float(step)})
    first.log({"step": 4, "split": "val", "t2v_r1": 40.0})
    first.close()  # the crashed run's tail: steps 3 and 4 are past the checkpoint at step 2

    resumed = TensorBoardLogger(log_dir, resume_step=2)
    for step in (3, 4):
        resumed.log({"step": step, "loss": 10.0 * step})
    resumed.close()

    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 2
    scalars = _read_scalars(log_dir)
    assert scalars["train/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    # The crashed run's validation at step 4 was never redone: it is purged too.
    assert scalars.get("val/t2v_r1", []) == []


@needs_tensorboard
def test_tensorboard_fresh_run_replaces_old_events(tmp_path: Path) -> None:
    log_dir = tmp_path / "tensorboard"
    old = TensorBoardLogger(log_dir, resume_step=None)
    old.log({"step": 1, "loss": 9.0})
    old.close()
    new = TensorBoardLogger(log_dir, resume_step=None)
    new.log({"step": 1, "loss": 1.0})
    new.close()
    assert _read_scalars(log_dir)["train/loss"] == [(1, 1.0)]


def test_tensorboard_disabled_creates_nothing(tmp_path: Path) -> None:
    log_dir = tmp_path / "tensorboard"
    logger = TensorBoardLogger(log_dir, resume_step=None, enabled=False)
    logger.log({"step": 1, "loss": 1.0})
    logger.close()
    assert not log_dir.exists()


def test_tensorboard_missing_package_raises_a_clear_import_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = builtins.__import__

    def no_tensorboard(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ImportError, match=r"pip install 'mama\[tensorboard\]'"):
        TensorBoardLogger(tmp_path / "tensorboard", resume_step=None)
    # A disabled logger (ranks other than 0) never imports it.
    TensorBoardLogger(tmp_path / "tensorboard", resume_step=None, enabled=False)


# --- fan-out and factory -----------------------------------------------------------------------


class _Recorder:
    def __init__(self, fail_on_close: bool = False) -> None:
        self.records: list[dict[str, Any]] = []
        self.closed = False
        self.fail_on_close = fail_on_close

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def close(self) -> None:
        self.closed = True
        if self.fail_on_close:
            raise RuntimeError("disk full")


def test_loggers_fan_out_and_close_all_even_if_one_fails() -> None:
    a, b = _Recorder(fail_on_close=True), _Recorder()
    assert isinstance(a, Logger)
    loggers = Loggers([a, b])
    loggers.log({"step": 1, "loss": 0.5})
    assert a.records == b.records == [{"step": 1, "loss": 0.5}]
    with pytest.raises(RuntimeError, match="disk full"):
        loggers.close()
    assert a.closed and b.closed


@needs_tensorboard
def test_build_loggers_writes_the_run_folder_layout(tmp_path: Path) -> None:
    loggers = build_loggers(["jsonl", "tensorboard"], tmp_path, resume_step=None, enabled=True)
    assert [type(logger) for logger in loggers.loggers] == [JsonlLogger, TensorBoardLogger]
    loggers.log({"step": 1, "loss": 0.25})
    loggers.close()
    assert _lines(tmp_path / "log.jsonl") == [{"step": 1, "loss": 0.25}]
    assert _read_scalars(tmp_path / "tensorboard")["train/loss"] == [(1, 0.25)]


def test_build_loggers_disabled_writes_nothing(tmp_path: Path) -> None:
    loggers = build_loggers(["jsonl", "tensorboard"], tmp_path, resume_step=None, enabled=False)
    loggers.log({"step": 1, "loss": 0.25})
    loggers.close()
    assert list(tmp_path.iterdir()) == []


def test_build_loggers_rejects_unknown_names_before_touching_files(tmp_path: Path) -> None:
    old = tmp_path / "log.jsonl"
    old.write_text(json.dumps({"step": 1}) + "\n")
    with pytest.raises(ValueError, match=r"wandb.*allowed.*'jsonl', 'tensorboard'"):
        build_loggers(["jsonl", "wandb"], tmp_path, resume_step=None, enabled=True)
    assert old.exists()  # the fresh-run delete did not happen
    with pytest.raises(ValueError, match="more than once"):
        build_loggers(["jsonl", "jsonl"], tmp_path, resume_step=None, enabled=True)
