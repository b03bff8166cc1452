"""The demo's runs trained several at a time, each in its own process with one thread: the numbers are
those of one-after-the-other training, and a failing run stops everything with its folder named."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from pathlib import Path

import pytest

from mama.config import load_config
from mama.demos.parallel import train_runs
from mama.tasks.retrieval import load_data


def _tiny_demo(root: Path, out: Path, tiny_overrides: Callable[[Path, Path], list[str]]) -> list[str]:
    return [o for o in tiny_overrides(root, out) if not o.startswith("train.out_dir=")] + ["train.steps=3"]


def test_parallel_runs_give_the_numbers_of_sequential_runs(
    tiny_synthvl: Path, tiny_overrides: Callable[[Path, Path], list[str]], tmp_path: Path
) -> None:
    from mama.demos.retrieval import run_demo

    common = dict(seeds=[0, 1], progress=False, regime="scratch")
    one = run_demo(tmp_path / "one", overrides=_tiny_demo(tiny_synthvl, tmp_path, tiny_overrides), jobs=1, **common)
    two = run_demo(tmp_path / "two", overrides=_tiny_demo(tiny_synthvl, tmp_path, tiny_overrides), jobs=2, **common)
    assert one["jobs"] == 1 and two["jobs"] == 2
    for variant, runs in one["per_seed"].items():
        for a, b in zip(runs, two["per_seed"][variant], strict=True):
            # Everything but the timings: bitwise the same metrics.
            assert {k: v for k, v in a.items() if k not in ("wall_s", "step_ms")} == {
                k: v for k, v in b.items() if k not in ("wall_s", "step_ms")
            }
    assert one["config"]["train"]["threads"] == 1


def test_a_failing_run_stops_the_batch_and_names_its_folder(
    tiny_synthvl: Path, tiny_overrides: Callable[[Path, Path], list[str]], tmp_path: Path
) -> None:
    good = load_config(None, [*tiny_overrides(tiny_synthvl, tmp_path / "good"), "train.steps=2"])
    data = load_data(good, progress=False)
    # A batch size the training split cannot fill: the run fails in its child process.
    bad = load_config(None, [*tiny_overrides(tiny_synthvl, tmp_path / "bad"), "train.steps=2", "train.batch_size=4096"])
    with pytest.raises(RuntimeError, match=r"bad.*Error"):
        train_runs([good, bad, good], data, jobs=2, progress=False)
    assert not mp.active_children()  # nothing left running
