"""Questions whose video cannot be decoded count as wrong in every QA accuracy: overall, per question
type, per concept bucket and for rare answers, and in the majority-answer baseline's denominator."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import mama.tasks.qa.evaluate
from mama.config import load_config
from mama.data.qa_records import read_qa_jsonl
from mama.tasks.qa import load_qa_data, rare_answers
from mama.tasks.qa.evaluate import evaluate_qa, majority_baseline
from mama.tasks.qa.task import build_qa_module

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
RECIPE = Path(__file__).resolve().parents[2] / "configs" / "synthvl_qa.yaml"


def _percent_kept(questions: list[Any], lost_videos: set[str], key: Any) -> dict[str, float]:
    """Per group (``key(q)``, None = no group): percent of its questions whose video survived."""
    totals, kept = Counter(), Counter()
    for q in questions:
        group = key(q)
        if group is not None:
            totals[group] += 1
            kept[group] += q.video_id not in lost_videos
    return {group: 100.0 * kept[group] / totals[group] for group in totals}


def test_lost_questions_count_wrong_per_type_bucket_and_rare_answer(
    tiny_qa_data: Path, tiny_overrides: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_qa_data, root, ignore=shutil.ignore_patterns(".cache"))
    questions = read_qa_jsonl(root / "qa_test.jsonl")
    # A count clip (its questions are all of type "count") and a concept clip (several types, one bucket).
    count_video = next(q for q in questions if q.qtype == "count")
    concept_video = next(q for q in questions if q.qtype == "colour")
    for q in (count_video, concept_video):
        q.video.write_bytes(b"not a video")
    lost_videos = {count_video.video_id, concept_video.video_id}
    lost = [q for q in questions if q.video_id in lost_videos]

    cfg = load_config(RECIPE, tiny_overrides(root, tmp_path / "run"))
    with pytest.warns(UserWarning, match="lost their video"):
        data = load_qa_data(cfg, ("train", "test"), progress=False)
    test, train = data.splits["test"], data.splits["train"]
    assert sorted(q.id for q in test.lost) == sorted(q.id for q in lost) and len(test) + len(lost) == len(questions)

    # An oracle that answers every question it can see correctly: every miss is a lost question.
    def oracle(module: Any, split: Any, cfg: Any) -> torch.Tensor:
        return F.one_hot(split.answer.clamp(min=0), cfg.qa.num_answers).float()

    monkeypatch.setattr(mama.tasks.qa.evaluate, "question_scores", oracle)
    module = build_qa_module(cfg, data.tokenizer, pretrained=False)
    metrics = evaluate_qa(module, test, cfg, data.vocab, train=train)

    assert metrics["num_questions"] == len(questions)
    assert metrics["accuracy"] == pytest.approx(100.0 * (len(questions) - len(lost)) / len(questions))
    per_type = _percent_kept(questions, lost_videos, lambda q: q.qtype)
    assert per_type["count"] < 100  # the count clip's questions are all of one type: its accuracy drops
    per_bucket = _percent_kept(questions, lost_videos, lambda q: q.meta.get("bucket"))
    rare = rare_answers(train)
    per_rarity = _percent_kept(questions, lost_videos, lambda q: (q.qtype, q.answer) in rare)
    expected = {
        **{f"acc_{t}": v for t, v in per_type.items()},
        **{f"acc_{b}": v for b, v in per_bucket.items()},
        "acc_rare_answers": per_rarity[True],
        "acc_common_answers": per_rarity[False],
    }
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)
    assert sum(v < 100 for v in expected.values()) >= 4  # the drops are visible, not averaged away

    # The majority answer needs no video: it is scored on every question.
    by_type = {t: Counter(q.answer for q in train.records if q.qtype == t) for t in per_type}
    hits = sum(by_type[q.qtype].most_common(1)[0][0] == q.answer for q in questions)
    assert majority_baseline(train, test) == pytest.approx(100.0 * hits / len(questions))
