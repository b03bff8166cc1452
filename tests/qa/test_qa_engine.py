"""`task: qa` end to end on a tiny SynthVL: `mama train` on the QA recipe, and `mama demo --task qa`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from mama.cli import main
from mama.qa.records import read_qa_jsonl
from mama.qa.synthvl_qa import write_synthvl_qa

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
RECIPE = Path(__file__).resolve().parents[2] / "configs" / "synthvl_qa.yaml"
TINY_QA = ["qa.fusion_width=32", "qa.fusion_heads=2", "qa.fusion_layers=1", "meta.batch_size=16", "train.log_every=20", "optim.lr=2e-3"]


@pytest.fixture(scope="module")
def qa_data(tiny_synthvl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("qa") / "data"
    shutil.copytree(tiny_synthvl, root, ignore=shutil.ignore_patterns(".cache"))
    write_synthvl_qa(root)
    return root


def test_qa_recipe_trains_and_beats_the_majority_answer(qa_data: Path, tiny_overrides: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", "--config", str(RECIPE), *tiny_overrides(qa_data, run), *TINY_QA, "train.steps=600"]) == 0
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((run / "metrics.json").read_text())
    # Every test question counts, answered or not.
    assert metrics["num_questions"] == len(read_qa_jsonl(qa_data / "qa_test.jsonl"))
    assert printed["accuracy"] == metrics["accuracy"]
    assert metrics["accuracy"] > metrics["majority_baseline"] + 10, metrics
    assert metrics["acc_background"] > 90  # the easiest question: one colour fills the frame
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 600 and "weight_noisy" in log[-1]  # meta weighting ran and is inspectable
    assert (run / "answers.json").exists() and any((run / "checkpoints").iterdir())


def test_qa_demo_compares_plain_and_meta_weighted(qa_data: Path, tiny_overrides: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    overrides = [o for o in tiny_overrides(qa_data, out / "unused") if not o.startswith("train.out_dir")]
    assert main(["demo", "--task", "qa", "--out", str(out), "--no-progress", *overrides, *TINY_QA, "train.steps=20"]) == 0
    printed = capsys.readouterr().out
    assert "majority-answer baseline" in printed and "plain" in printed and "meta" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["variants"]) == {"plain", "meta"} and results["seeds"] == [0]
    assert all("accuracy" in v and "acc_tail" in v for v in results["variants"].values())
