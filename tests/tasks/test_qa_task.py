"""`task: qa` end to end on a tiny SynthVL: `mama train` on the QA recipe, and `mama demo --task qa`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mama.cli import main
from mama.data.qa_records import read_qa_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
RECIPE = Path(__file__).resolve().parents[2] / "configs" / "synthvl_qa.yaml"
TINY_QA = [
    "qa.fusion_width=32",
    "qa.fusion_heads=2",
    "qa.fusion_layers=1",
    "meta.batch_size=16",
    "train.log_every=20",
    "optim.lr=2e-3",
]


def test_qa_recipe_trains_and_beats_the_majority_answer(
    tiny_qa_data: Path, tiny_overrides: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert (
        main(["train", "--config", str(RECIPE), *tiny_overrides(tiny_qa_data, run), *TINY_QA, "train.steps=600"]) == 0
    )
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((run / "metrics.json").read_text())
    # Every test question counts, answered or not.
    assert metrics["num_questions"] == len(read_qa_jsonl(tiny_qa_data / "qa_test.jsonl"))
    assert printed["accuracy"] == metrics["accuracy"]
    assert metrics["accuracy"] > metrics["majority_baseline"] + 10, metrics
    # The easiest question (one colour fills the frame); one of its 3 answers is systematically
    # mislabelled in training (SynthVL QA's noise model), so the other two are what must be learned.
    assert metrics["acc_background"] > 60
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 600 and "weight_noisy" in log[-1]  # meta weighting ran and is inspectable
    assert (run / "answers.json").exists() and any((run / "checkpoints").iterdir())


def test_qa_demo_compares_plain_and_meta_weighted(
    tiny_qa_data: Path, tiny_overrides: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    overrides = [o for o in tiny_overrides(tiny_qa_data, out / "unused") if not o.startswith("train.out_dir")]
    assert (
        main(["demo", "--task", "qa", "--out", str(out), "--no-progress", *overrides, *TINY_QA, "train.steps=20"]) == 0
    )
    printed = capsys.readouterr().out
    assert "majority-answer baseline" in printed and "plain" in printed and "meta" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["variants"]) == {"plain", "meta"} and results["seeds"] == [0]
    assert all("accuracy" in v and "acc_tail" in v and "acc_rare_answers" in v for v in results["variants"].values())


def test_multiple_choice_qa_trains_with_uneven_candidate_counts(
    tiny_qa_data: Path, tiny_overrides: Any, tmp_path: Path
) -> None:
    """SynthVL's multiple-choice questions have 2 to 5 candidates: padding candidates are never chosen.

    Trained on clean answers: this checks that multiple choice learns at all, and the systematic noise of
    SynthVL QA's training answers holds the tiny model near chance in 600 steps. The margin over chance is
    small (count answers are words the tokenizer never saw, so their candidates tie and count as wrong)."""
    import shutil

    from mama.data.synthvl_qa import write_synthvl_qa

    root = tmp_path / "data"
    shutil.copytree(tiny_qa_data, root, ignore=shutil.ignore_patterns(".cache"))
    write_synthvl_qa(root, noise_rate=0.0, progress=False)
    run = tmp_path / "run"
    files = [f"qa.{s}=qa_mc_{s}.jsonl" for s in ("train", "meta", "val", "test")]
    mc = [*files, "qa.answer_format=mc", "meta.virtual_params=[model.mc_head, model.blocks]", "train.steps=600"]
    assert main(["train", "--config", str(RECIPE), *tiny_overrides(root, run), *TINY_QA, *mc]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_questions"] == len(read_qa_jsonl(root / "qa_mc_test.jsonl"))
    # Chance is 1/C per type (1/2 for size ... 1/5 for shape): the model must beat the mean chance level.
    chance = 100 * sum(1 / c for c in (5, 5, 4, 2, 3, 4)) / 6  # colour, shape, motion, size, background, count
    assert metrics["accuracy"] > chance + 5, {k: v for k, v in metrics.items() if k.startswith("acc")}
    assert metrics["acc_background"] > 90  # the easiest question: one colour fills the frame


@pytest.mark.parametrize("recipe", ["msrvtt_qa_clip_b32.yaml", "nextqa_clip_b32.yaml"])
def test_clip_qa_recipes_run_with_a_tiny_clip(
    recipe: str, tiny_qa_data: Path, tiny_clip_dir: Path, tmp_path: Path
) -> None:
    """The CLIP QA recipes (backbone at its own lr, meta step through the fusion) on SynthVL's questions."""
    mc = recipe.startswith("nextqa")
    files = [f"qa.{s}=qa{'_mc' if mc else ''}_{s}.jsonl" for s in ("train", "meta", "val", "test")]
    overrides = [
        f"data.root={tiny_qa_data}", 'data.videos=""', "qa.format=jsonl", *files, f"model.pretrained={tiny_clip_dir}",
        "data.frame_size=32", "model.frame_size=32", "data.num_frames=4", "model.max_frames=4", "data.workers=0",
        "model.max_text_length=16", "model.temporal_layers=1", "qa.fusion_width=32", "qa.fusion_heads=2",
        "train.batch_size=8", "meta.batch_size=8", "train.steps=4", "train.precision=fp32", "train.device=cpu",
        "train.progress=false", "train.log_every=2", "eval.batch_size=64", f"train.out_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    assert main(["train", "--config", str(RECIPE.parent / recipe), *overrides]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["num_questions"] == len(read_qa_jsonl(tiny_qa_data / files[-1].split("=")[1]))
    from mama.checkpoint import load_checkpoint

    groups = load_checkpoint(tmp_path / "run" / "checkpoints").state["optimizer"]["param_groups"]
    assert sorted({g["initial_lr"] for g in groups}) == [2e-5, 1e-4]  # the CLIP backbone at optim.backbone_lr


def test_meta_questions_held_out_of_training_are_balanced_and_share_no_video(
    tiny_qa_data: Path, tiny_overrides: Any, tmp_path: Path
) -> None:
    from collections import Counter

    from mama.tasks.qa import hold_out_questions

    questions = read_qa_jsonl(tiny_qa_data / "qa_train.jsonl")
    train, meta = hold_out_questions(questions, 50)
    assert len(meta) == 50 and hold_out_questions(questions, 50)[1] == meta  # a fixed function of the data
    assert not {q.video_id for q in meta} & {q.video_id for q in train}
    per_group = Counter((q.qtype, q.answer) for q in meta)
    assert max(per_group.values()) - min(per_group.values()) <= 1  # round-robin over (type, answer)
    run = tmp_path / "run"
    overrides = [*tiny_overrides(tiny_qa_data, run), *TINY_QA, 'qa.meta=""', "qa.meta_holdout=40", "train.steps=20"]
    assert main(["train", "--config", str(RECIPE), *overrides]) == 0
    assert json.loads((run / "metrics.json").read_text())["accuracy"] >= 0


def test_rare_answers_are_the_least_frequent_third_per_type() -> None:
    from types import SimpleNamespace

    from mama.data.qa_records import QARecord
    from mama.tasks.qa import rare_answers

    def q(qtype: str, answer: str, i: int) -> QARecord:
        return QARecord(f"{qtype}{answer}{i}", "v", Path("v.mp4"), "what?", answer, qtype=qtype)

    counts = {
        "colour": {"red": 9, "blue": 5, "green": 2, "pink": 1, "cyan": 1, "gray": 3},
        "size": {"small": 6, "large": 1},
    }
    records = [q(t, a, i) for t, answers in counts.items() for a, n in answers.items() for i in range(n)]
    assert rare_answers(SimpleNamespace(records=records)) == {("colour", "cyan"), ("colour", "pink"), ("size", "large")}
