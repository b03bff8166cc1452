"""Tests for mama.data.qa_records and mama.data.qa_datasets: the question record and the QA benchmark readers.

Each fixture is a few questions in the real layout (file names, columns, keys; rows taken from the
official releases) written into tmp_path; videos are empty placeholder files, since only the index
looks at them.
"""

from __future__ import annotations

import csv
import json
import pickle
import re
from collections.abc import Iterable
from pathlib import Path

import pytest

from mama.data.qa_datasets import QA_FORMATS, read_qa_dataset
from mama.data.qa_records import QARecord, question_word, read_qa_jsonl, write_qa_jsonl
from mama.data.records import AnnotationError


def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def _write_json(path: Path, obj: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _write_table(path: Path, header: list[str], rows: Iterable[list[object]], delimiter: str = ",") -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _row(*cells: str) -> str:
    return "\t".join(cells)


def _tsv(path: Path, lines: list[str]) -> Path:
    # TGIF-QA's files are written by hand: tab-separated, never quoted.
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------
# The record type and our JSONL format


def test_question_word() -> None:
    assert question_word("what is a man doing?") == "what"
    assert question_word("Who is singing ?") == "who"
    assert question_word("how many people are there?") == "how"
    assert question_word("  where is the dog?") == "where"
    assert question_word("when does the man jump?") == "when"
    assert question_word("is the man happy?") == "other"
    assert question_word("whose car is it?") == "other"


def test_record_validation(tmp_path: Path) -> None:
    base = {"id": "q1", "video_id": "v1", "video": tmp_path / "v1.mp4", "question": "what?"}
    mc = QARecord(**base, answer="b", kind="mc", candidates=["a", "b"], answer_index=1)
    assert mc.kind == "mc" and mc.answer_index == 1
    with pytest.raises(ValueError, match="at least 2 candidates"):
        QARecord(**base, answer="a", kind="mc", candidates=["a"], answer_index=0)
    with pytest.raises(ValueError, match="answer_index must be an index"):
        QARecord(**base, answer="a", kind="mc", candidates=["a", "b"], answer_index=2)
    with pytest.raises(ValueError, match="answer_index must be an index"):
        QARecord(**base, answer="a", kind="mc", candidates=["a", "b"])
    with pytest.raises(ValueError, match="is not candidate 0"):
        QARecord(**base, answer="b", kind="mc", candidates=["a", "b"], answer_index=0)
    with pytest.raises(ValueError, match="no candidates"):
        QARecord(**base, answer="a", candidates=["a", "b"])
    with pytest.raises(ValueError, match="non-empty answer"):
        QARecord(**base, answer=" ")
    with pytest.raises(ValueError, match="unknown question kind"):
        QARecord(**base, answer="a", kind="yesno")
    with pytest.raises(ValueError, match="reserved|record's own keys"):
        QARecord(**base, answer="a", meta={"qtype": "x"})
    with pytest.raises(ValueError, match="question must be a non-empty string"):
        QARecord(**{**base, "question": ""}, answer="a")


def test_jsonl_open_and_mc_round_trip(tmp_path: Path) -> None:
    _touch(tmp_path, "videos/vid1.mp4", "videos/nested/vid2.mp4")
    lines = [
        {"id": "q1", "video": "videos/vid1.mp4", "question": "what is the man doing?", "answer": "cooking"},
        {
            "id": "q2",
            "video_id": "vid2",
            "question": "why did the dog bark?",
            "candidates": ["hungry", "saw a cat", "playing"],
            "answer": "saw a cat",
            "qtype": "causal",
            "source": "handmade",
        },
        {"id": "q3", "video_id": "vid2", "question": "which?", "candidates": ["x", "y"], "answer_index": 0},
    ]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")

    records = read_qa_jsonl(path, tmp_path / "videos")
    assert [r.id for r in records] == ["q1", "q2", "q3"]
    q1, q2, q3 = records
    assert (q1.kind, q1.answer, q1.video_id, q1.qtype) == ("open", "cooking", "vid1", "")
    assert q1.video == tmp_path / "videos/vid1.mp4"
    assert (q2.kind, q2.answer_index, q2.answer, q2.qtype) == ("mc", 1, "saw a cat", "causal")
    assert q2.video == tmp_path / "videos/nested/vid2.mp4"
    assert q2.meta == {"source": "handmade"}
    assert (q3.answer, q3.answer_index) == ("x", 0)

    # Without a videos folder, "video" is relative to the file and "video_id" alone gives <folder>/<id>.mp4.
    plain = read_qa_jsonl(path)
    assert plain[0].video == tmp_path / "videos/vid1.mp4"
    assert plain[1].video == tmp_path / "vid2.mp4"

    out = write_qa_jsonl(tmp_path / "out/qa.jsonl", records, root=tmp_path / "out")
    assert read_qa_jsonl(out) == records
    assert json.loads(out.read_text().splitlines()[0])["video"] == "../videos/vid1.mp4"
    assert read_qa_dataset("jsonl", out, None) == records


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            (
                '{"id": "q", "video_id": "v", "question": "q?", "candidates": ["a", "b"], "answer": "a", '
                '"answer_index": 1}'
            ),
            "is not candidate 1",
        ),
        (
            '{"id": "q", "video_id": "v", "question": "q?", "candidates": ["a", "b"], "answer": "c"}',
            "is not among the candidates",
        ),
        (
            '{"id": "q", "video_id": "v", "question": "q?", "candidates": ["a", "a"], "answer": "a"}',
            "occurs more than once",
        ),
        (
            '{"id": "q", "video_id": "v", "question": "q?", "candidates": ["a"], "answer_index": 0}',
            "at least 2 candidates",
        ),
        ('{"id": "q", "video_id": "v", "question": "q?", "answer": "a", "answer_index": 0}', 'without "candidates"'),
        ('{"id": "q", "question": "q?", "answer": "a"}', 'missing "video" or "video_id"'),
        ('{"id": "q", "video_id": "v", "question": "q?"}', "missing 'answer'"),
        ('{"id": "q", "video_id": "v", "question": "q?", "answer": "a", "kind": "mc"}', '"kind" is'),
        ('{"id": "q1", "video_id": "v", "question": "q?", "answer": "a"}', "duplicate question id 'q1'"),
        ('{"id": "q", "video_id": "v", "question": ', "invalid JSON"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "qa.jsonl"
    good = '{"id": "q1", "video_id": "v", "question": "q?", "answer": "a"}'
    path.write_text(good + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        read_qa_jsonl(path)
    assert str(info.value).startswith(f"{path}: line 2: ")


# ---------------------------------------------------------------------------------------------------
# MSRVTT-QA and MSVD-QA


def _msrvtt_qa(root: Path) -> Path:
    return _write_json(
        root / "train_qa.json",
        [
            {"answer": "man", "category_id": 13, "id": 0, "question": "who is talking in a car?", "video_id": 0},
            {"answer": "talk", "category_id": 13, "id": 1, "question": "what is a man doing?", "video_id": 0},
            {"answer": "cartoon", "category_id": 2, "id": 2, "question": "what is shown?", "video_id": 7010},
            {"answer": "two", "category_id": 2, "id": 3, "question": "how many men are there?", "video_id": 7010},
            {"answer": "night", "category_id": 5, "id": 4, "question": "when is it?", "video_id": 9999},
        ],
    )


def test_msrvtt_qa(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    _touch(videos, "TrainValVideo/video0.mp4", "TestVideo/video7010.mp4")
    records = read_qa_dataset("msrvtt_qa", _msrvtt_qa(tmp_path), videos)
    assert [r.id for r in records] == ["0", "1", "2", "3", "4"]
    assert [r.video_id for r in records] == ["video0", "video0", "video7010", "video7010", "video9999"]
    assert [r.qtype for r in records] == ["who", "what", "what", "how", "when"]
    assert [r.answer for r in records] == ["man", "talk", "cartoon", "two", "night"]
    assert all(r.kind == "open" and r.candidates == [] and r.answer_index is None for r in records)
    assert records[0].video == videos / "TrainValVideo/video0.mp4"
    assert records[2].video == videos / "TestVideo/video7010.mp4"
    assert records[4].video == videos / "video9999.mp4"  # absent: expected path, skipped by the loader
    assert records[0].meta == {"category_id": 13}


def test_msrvtt_qa_bad_entry(tmp_path: Path) -> None:
    path = _write_json(
        tmp_path / "val_qa.json",
        [
            {"answer": "man", "id": 0, "question": "who is there?", "video_id": 1},
            {"id": 1, "question": "what is it?", "video_id": 1},
        ],
    )
    with pytest.raises(ValueError, match=r"val_qa.json: entry 1: missing 'answer'"):
        read_qa_dataset("msrvtt_qa", path, None)
    _write_json(path, [{"answer": "a", "id": 0, "question": "who?", "video_id": "video1"}])
    with pytest.raises(ValueError, match="entry 0: 'video_id' must be int"):
        read_qa_dataset("msrvtt_qa", path, None)
    _write_json(path, [{"answer": "a", "id": 0, "question": "who?", "video_id": 1}] * 2)
    with pytest.raises(ValueError, match=r"entry 1: duplicate question id '0' \(first at entry 0\)"):
        read_qa_dataset("msrvtt_qa", path, None)


def _msvd_qa(root: Path) -> Path:
    return _write_json(
        root / "test_qa.json",
        [
            {"answer": "man", "id": 30933, "question": "who is slicing a tomato?", "video_id": 1},
            {"answer": "slice", "id": 30934, "question": "what is the man doing?", "video_id": 1},
            {"answer": "cat", "id": 30935, "question": "what is playing with a toy?", "video_id": 2},
            {"answer": "kitchen", "id": 30936, "question": "where is the man?", "video_id": 3},
        ],
    )


def test_msvd_qa_with_youtube_mapping(tmp_path: Path) -> None:
    videos = tmp_path / "YouTubeClips"
    _touch(videos, "-4wsuPCjDBc_5_15.avi", "vid2.avi")  # one original name, one renamed clip
    (tmp_path / "youtube_mapping.txt").write_text(
        "-4wsuPCjDBc_5_15 vid1\n-7KMZQEsJW4_205_208 vid2\n-8y1Q0rA3n8_108_115 vid3\n", encoding="utf-8"
    )
    records = read_qa_dataset("msvd_qa", _msvd_qa(tmp_path), videos)
    assert [r.id for r in records] == ["30933", "30934", "30935", "30936"]
    assert [r.video_id for r in records] == [
        "-4wsuPCjDBc_5_15", "-4wsuPCjDBc_5_15", "-7KMZQEsJW4_205_208", "-8y1Q0rA3n8_108_115"
    ]  # fmt: skip
    assert [r.meta["vid"] for r in records] == ["vid1", "vid1", "vid2", "vid3"]
    assert [r.qtype for r in records] == ["who", "what", "what", "where"]
    assert records[0].video == videos / "-4wsuPCjDBc_5_15.avi"
    assert records[2].video == videos / "vid2.avi"  # found by its vid<N> name too
    assert records[3].video == videos / "-8y1Q0rA3n8_108_115.mp4"  # absent: expected under the clip name


def test_msvd_qa_without_mapping_and_bad_mapping(tmp_path: Path) -> None:
    path = _msvd_qa(tmp_path)
    records = read_qa_dataset("msvd_qa", path, None)
    assert [r.video_id for r in records] == ["vid1", "vid1", "vid2", "vid3"]
    assert records[0].video == tmp_path / "vid1.mp4" and records[0].meta == {}

    mapping = tmp_path / "youtube_mapping.txt"
    mapping.write_text("-4wsuPCjDBc_5_15 vid1\n-7KMZQEsJW4_205_208 vid2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"test_qa.json: entry 3: vid3 is not in .*youtube_mapping.txt"):
        read_qa_dataset("msvd_qa", path, None)
    mapping.write_text("-4wsuPCjDBc_5_15 vid1\n-7KMZQEsJW4_205_208\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"youtube_mapping.txt: line 2: expected '<clip name> vid<N>'"):
        read_qa_dataset("msvd_qa", path, None)


# ---------------------------------------------------------------------------------------------------
# TGIF-QA


def test_tgif_qa_frameqa(tmp_path: Path) -> None:
    path = _tsv(
        tmp_path / "Test_frameqa_question.csv",
        [
            _row("gif_name", "question", "answer", "type", "vid_id", "key", "description"),
            _row(
                "tumblr_no73q2fm0I1uuf348o1_250",
                "what is being placed in the white ice cream cone ?",
                "cookie",
                "0",
                "FRAMEQA1159",
                "27138",
                "a chocolate cookie is being placed in a white ice cream cone .",
            ),
            _row(
                "tumblr_ndkfsb1dgm1tbnwqmo1_400",
                "how many people are sitting side by side in a bowling alley ?",
                "two",
                "1",
                "FRAMEQA26835",
                "61016",
                "two people are sitting side by side in a bowling alley .",
            ),
            _row(
                "tumblr_nh7j4ud4Mb1u5xywco1_500",
                'what is the color of the "shirt" ?',
                "black",
                "2",
                "FRAMEQA4460",
                "87751",
                "a man in a black shirt was singing and dancing .",
            ),
            _row(
                "tumblr_nauka09f5w1qf6wjoo1_400",
                "where is the woman wearing a blue jacket is standing . ?",
                "room",
                "3",
                "FRAMEQA32248",
                "36153",
                "a woman wearing a blue jacket is standing in a room .",
            ),
        ],
    )
    gifs = tmp_path / "gifs"
    _touch(gifs, "tumblr_no73q2fm0I1uuf348o1_250.gif", "mp4/tumblr_ndkfsb1dgm1tbnwqmo1_400.mp4")
    records = read_qa_dataset("tgif_qa", path, gifs)
    assert [r.id for r in records] == ["FRAMEQA1159", "FRAMEQA26835", "FRAMEQA4460", "FRAMEQA32248"]
    assert [r.answer for r in records] == ["cookie", "two", "black", "room"]
    assert [r.qtype for r in records] == ["object", "number", "color", "location"]
    assert all(r.kind == "open" and r.meta["task"] == "frameqa" for r in records)
    assert records[0].meta["key"] == "27138"
    assert records[2].question == 'what is the color of the "shirt" ?'  # quotes are not CSV quoting
    assert records[0].video == gifs / "tumblr_no73q2fm0I1uuf348o1_250.gif"  # the official flat GIF folder
    assert records[1].video == gifs / "mp4/tumblr_ndkfsb1dgm1tbnwqmo1_400.mp4"  # a converted copy
    assert records[3].video == gifs / "tumblr_nauka09f5w1qf6wjoo1_400.gif"  # absent: expected path


def test_tgif_qa_action_and_transition(tmp_path: Path) -> None:
    header = "gif_name\tquestion\ta1\ta2\ta3\ta4\ta5\tanswer\tvid_id\tkey"
    action = _tsv(
        tmp_path / "Train_action_question.csv",
        [
            header,
            _row(
                "tumblr_nk172bbdPI1u1lr18o1_250",
                "What does the butterfly do 10 or more than 10 times ?",
                "stuff marshmallow",
                "holds a phone towards face",
                "fall over",
                "talk",
                "flap wings",
                "4",
                "ACTION4",
                "26",
            ),
            _row(
                "tumblr_nezfs4uELd1u1a7cmo1_250",
                "What does the man do 3 times ?",
                "step like a goose",
                "react to hands",
                "making face face",
                "adjust waistband",
                "sway microphone left and right",
                "3",
                "ACTION12",
                "52",
            ),
        ],
    )
    records = read_qa_dataset("tgif_qa", action, None)
    assert [r.id for r in records] == ["ACTION4", "ACTION12"]
    first = records[0]
    assert first.kind == "mc" and first.qtype == "action" and first.meta == {"task": "action", "key": "26"}
    assert first.candidates == ["stuff marshmallow", "holds a phone towards face", "fall over", "talk", "flap wings"]
    assert (first.answer_index, first.answer) == (4, "flap wings")
    assert first.video_id == "tumblr_nk172bbdPI1u1lr18o1_250"
    assert first.video == tmp_path / "tumblr_nk172bbdPI1u1lr18o1_250.gif"

    rows = [
        header,
        _row("tumblr_n9y2jhq01L1rts5xfo1_250", "What does the man do before point to the camera ?",
             "vacuum with unnattached tube", "tilt head", "tip hat", "removes glasses", "sing passionately", "4",
             "TRANS23", "23"),
        _row("tumblr_n9y2jhq01L1rts5xfo1_250", "What does the man do after sing passionately ?",
             "point to the camera", "dance in black", "lick out tongue", "drift into turn", "flicker", "0",
             "TRANS24", "23"),
    ]  # fmt: skip
    records = read_qa_dataset("tgif_qa", _tsv(tmp_path / "Total_transition_question.csv", rows), None)
    assert [(r.id, r.qtype, r.answer) for r in records] == [
        ("TRANS23", "transition", "sing passionately"),
        ("TRANS24", "transition", "point to the camera"),
    ]
    # A renamed file falls back to the vid_id prefix.
    records = read_qa_dataset("tgif_qa", _tsv(tmp_path / "mine.tsv", rows), None)
    assert {r.qtype for r in records} == {"transition"}


def test_tgif_qa_errors(tmp_path: Path) -> None:
    bad_type = _tsv(
        tmp_path / "Train_frameqa_question.csv",
        [
            "gif_name\tquestion\tanswer\ttype\tvid_id\tkey",
            "tumblr_a\twhat is the dog eating ?\tleaf\t0\tFRAMEQA1\t1",
            "tumblr_b\twhat is the dog eating ?\tleaf\t7\tFRAMEQA2\t2",
        ],
    )
    with pytest.raises(ValueError, match=r"Train_frameqa_question.csv: line 3: 'type' must be 0-3"):
        read_qa_dataset("tgif_qa", bad_type, None)
    bad_index = _tsv(
        tmp_path / "Test_action_question.csv",
        ["gif_name\tquestion\ta1\ta2\ta3\ta4\ta5\tanswer\tvid_id\tkey", "g\tWhat ?\ta\tb\tc\td\te\t5\tACTION1\t1"],
    )
    with pytest.raises(ValueError, match=r"line 2: 'answer' must be a candidate index 0-4"):
        read_qa_dataset("tgif_qa", bad_index, None)
    short = _tsv(
        tmp_path / "Test_action_question.csv",
        ["gif_name\tquestion\ta1\ta2\ta3\ta4\ta5\tanswer\tvid_id\tkey", "g\tWhat ?\ta\tb\tc\td\te\t1\tACTION1"],
    )
    with pytest.raises(ValueError, match=r"line 2: expected 10 columns"):
        read_qa_dataset("tgif_qa", short, None)
    count = _tsv(
        tmp_path / "Test_count_question.csv",
        ["gif_name\tquestion\tanswer\tvid_id\tkey", "tumblr_x\tHow many times does the man step ?\t3\tCOUNT12\t52"],
    )
    with pytest.raises(ValueError, match="TGIF-QA Count"):
        read_qa_dataset("tgif_qa", count, None)
    comma = _write_table(tmp_path / "frameqa.csv", ["gif_name", "question", "answer", "type", "vid_id"], [])
    with pytest.raises(ValueError, match="tab-separated"):
        read_qa_dataset("tgif_qa", comma, None)


# ---------------------------------------------------------------------------------------------------
# NExT-QA

_NEXTQA_HEADER = ["video", "frame_count", "width", "height", "question", "answer", "qid", "type",
                  "a0", "a1", "a2", "a3", "a4"]  # fmt: skip
_NEXTQA_ROWS = [
    ["4010069381", 369, 640, 480, "how do the two man play the instrument", 0, 6, "CH",
     "roll the handle", "tap their feet", "strum the string", "hit with sticks", "pat with hand"],
    ["2834146886", 1881, 496, 370, "what does the white dog do after going to the cushion", 2, 8, "TN",
     "drink again", "shake its body", "smells the black dog", "wagging tail", "touch lady in blue stripes"],
    ["7508439506", 765, 640, 480, "why did the boy put his hands on the baby", 0, 1, "CW",
     "play with baby", "to give her food", "play", "support the baby", "fall and pounce on the boy"],
    ["7508439506", 765, 640, 480, "where is this video taken", 4, 4, "DL",
     "swimming pool", "outdoor", "field", "desert", "bed room"],
]  # fmt: skip


def test_nextqa_with_map_file(tmp_path: Path) -> None:
    path = _write_table(tmp_path / "val.csv", _NEXTQA_HEADER, _NEXTQA_ROWS)
    _write_json(
        tmp_path / "map_vid_vidorID.json",
        {"4010069381": "1025/4010069381", "2834146886": "0101/2834146886", "7508439506": "1100/7508439506"},
    )
    videos = tmp_path / "NExTVideo"
    _touch(videos, "1025/4010069381.mp4", "1100/7508439506.mp4")
    records = read_qa_dataset("nextqa", path, videos)
    assert [r.id for r in records] == ["4010069381_6", "2834146886_8", "7508439506_1", "7508439506_4"]
    assert [r.qtype for r in records] == ["causal", "temporal", "causal", "descriptive"]
    assert [r.meta["fine_type"] for r in records] == ["CH", "TN", "CW", "DL"]
    assert [(r.answer_index, r.answer) for r in records] == [
        (0, "roll the handle"), (2, "smells the black dog"), (0, "play with baby"), (4, "bed room")
    ]  # fmt: skip
    assert all(r.kind == "mc" and len(r.candidates) == 5 for r in records)
    first = records[0]
    assert first.video_id == "4010069381" and first.question == "how do the two man play the instrument"
    assert first.meta == {"fine_type": "CH", "frame_count": 369, "width": 640, "height": 480,
                          "vidor_path": "1025/4010069381"}  # fmt: skip
    assert first.video == videos / "1025/4010069381.mp4"
    assert records[3].video == videos / "1100/7508439506.mp4"
    assert records[1].video == videos / "0101/2834146886.mp4"  # absent: expected in its VidOR folder


def test_nextqa_without_map_file_and_errors(tmp_path: Path) -> None:
    path = _write_table(tmp_path / "test.csv", _NEXTQA_HEADER, _NEXTQA_ROWS[:2])
    videos = tmp_path / "NExTVideo"
    _touch(videos, "1025/4010069381.mp4")
    records = read_qa_dataset("nextqa", path, videos)
    assert records[0].video == videos / "1025/4010069381.mp4"  # found by the recursive index anyway
    assert records[1].video == videos / "2834146886.mp4"
    assert "vidor_path" not in records[0].meta

    _write_json(tmp_path / "map_vid_vidorID.json", {"4010069381": "1025/4010069381"})
    with pytest.raises(ValueError, match=r"test.csv: line 3: video '2834146886' is not in .*map_vid_vidorID.json"):
        read_qa_dataset("nextqa", path, videos)
    (tmp_path / "map_vid_vidorID.json").unlink()

    bad = [list(_NEXTQA_ROWS[0]), [*_NEXTQA_ROWS[1][:5], 5, *_NEXTQA_ROWS[1][6:]]]
    _write_table(path, _NEXTQA_HEADER, bad)
    with pytest.raises(ValueError, match=r"test.csv: line 3: 'answer' must be a candidate index 0-4"):
        read_qa_dataset("nextqa", path, None)
    bad = [[*_NEXTQA_ROWS[0][:7], "XX", *_NEXTQA_ROWS[0][8:]]]
    _write_table(path, _NEXTQA_HEADER, bad)
    with pytest.raises(ValueError, match=r"line 2: unknown question type 'XX'"):
        read_qa_dataset("nextqa", path, None)
    _write_table(path, _NEXTQA_HEADER[:-1], [row[:-1] for row in _NEXTQA_ROWS])
    with pytest.raises(ValueError, match=r"missing columns \['a4'\]"):
        read_qa_dataset("nextqa", path, None)
    _write_table(path, _NEXTQA_HEADER, [_NEXTQA_ROWS[2], _NEXTQA_ROWS[2]])
    with pytest.raises(ValueError, match=r"line 3: duplicate question id '7508439506_1' \(first at line 2\)"):
        read_qa_dataset("nextqa", path, None)


# ---------------------------------------------------------------------------------------------------
# Causal-VidQA


def _causal_video(qa: Path, video: str, answers: dict[str, dict[str, int]] | None = None) -> None:
    text = {
        "descriptive": {
            "question": "What is the man in black doing?",
            "answer": ["He is dancing.", "He is surfing.", "He is cooking.", "He is singing.", "He is running."],
        },
        "explanatory": {
            "question": "Why does the man in black raise his arms?",
            "answer": ["To keep balance.", "To wave.", "To catch a ball.", "To stretch.", "To dance."],
        },
        "predictive": {
            "question": "What will happen next?",
            "answer": ["He falls.", "He rides the wave.", "He swims.", "He stops.", "He jumps."],
            "reason": ["The wave is big.", "He is skilled.", "It rains.", "He is tired.", "The sea is calm."],
        },
        "counterfactual": {
            "question": "What would happen if the wave were smaller?",
            "answer": ["He would stop.", "He would fall.", "Nothing.", "He would fly.", "He would swim."],
            "reason": ["Less push.", "More push.", "No reason.", "Wind.", "The board breaks."],
        },
    }
    answer = answers or {
        "descriptive": {"answer": 1},
        "explanatory": {"answer": 0},
        "predictive": {"answer": 1, "reason": 1},
        "counterfactual": {"answer": 0, "reason": 0},
    }
    _write_json(qa / video / "text.json", text)
    _write_json(qa / video / "answer.json", answer)


def test_causal_vidqa(tmp_path: Path) -> None:
    data = tmp_path / "data"
    split = data / "split"
    split.mkdir(parents=True)
    vids = ["2VBmRPrfNZY_000000_000010", "-0Ue8i-9aYY_000027_000037"]
    (split / "valid.pkl").write_bytes(pickle.dumps(vids, protocol=2))
    for vid in vids:
        _causal_video(data / "QA", vid)
    _touch(data, f"videos/{vids[0]}.mp4")

    records = read_qa_dataset("causal_vidqa", split / "valid.pkl", data / "videos")
    assert len(records) == 12
    first = records[:6]
    assert [r.id for r in first] == [f"{vids[0]}_{n}" for n in range(6)]
    assert [r.qtype for r in first] == [
        "descriptive", "explanatory", "predictive_answer", "predictive_reason",
        "counterfactual_answer", "counterfactual_reason",
    ]  # fmt: skip
    assert [r.answer for r in first] == [
        "He is surfing.", "To keep balance.", "He rides the wave.", "He is skilled.", "He would stop.", "Less push."
    ]  # fmt: skip
    assert [r.meta for r in first] == [{}, {}, {"part": "answer"}, {"part": "reason"}, {"part": "answer"},
                                       {"part": "reason"}]  # fmt: skip
    assert first[2].question == first[3].question == "What will happen next?"
    assert first[3].candidates[0] == "The wave is big." and first[3].answer_index == 1
    assert all(r.kind == "mc" and len(r.candidates) == 5 and r.video_id == vids[0] for r in first)
    assert first[0].video == data / "videos" / f"{vids[0]}.mp4"
    assert records[6].video == data / "videos" / f"{vids[1]}.mp4"  # absent: expected path

    # A text split next to QA/; videos default to the folder holding QA/.
    (data / "test.txt").write_text(f"{vids[1]}\n\n", encoding="utf-8")
    records = read_qa_dataset("causal_vidqa", data / "test.txt", None)
    assert [r.id for r in records] == [f"{vids[1]}_{n}" for n in range(6)]
    assert records[0].video == data / f"{vids[1]}.mp4"


def test_causal_vidqa_errors(tmp_path: Path) -> None:
    split = tmp_path / "split"
    split.mkdir()
    (split / "train.pkl").write_bytes(pickle.dumps(["vidA", "vidB"]))
    with pytest.raises(FileNotFoundError, match="needs the QA/ folder"):
        read_qa_dataset("causal_vidqa", split / "train.pkl", None)

    qa = tmp_path / "QA"
    _causal_video(qa, "vidA")
    (qa / "vidB").mkdir()
    _write_json(qa / "vidB" / "text.json", {})
    with pytest.raises(FileNotFoundError, match=r"video 'vidB' \(entry 2\) has no .*vidB/answer.json"):
        read_qa_dataset("causal_vidqa", split / "train.pkl", None)

    _causal_video(qa, "vidB", answers={"descriptive": {"answer": 5}})
    with pytest.raises(ValueError, match=r"vidB/answer.json: descriptive.answer: must be a candidate index 0-4"):
        read_qa_dataset("causal_vidqa", split / "train.pkl", None)
    _causal_video(qa, "vidB", answers={"descriptive": {"answer": 1}, "explanatory": {"answer": 0}})
    with pytest.raises(ValueError, match=r"vidB/answer.json: predictive.answer: missing 'predictive'"):
        read_qa_dataset("causal_vidqa", split / "train.pkl", None)

    # The split pickle is read without running code: any class or function lookup is refused.
    (split / "train.pkl").write_bytes(pickle.dumps(Path("vidA")))
    with pytest.raises(ValueError, match="refusing to load"):
        read_qa_dataset("causal_vidqa", split / "train.pkl", None)
    (split / "train.pkl").write_bytes(pickle.dumps({"vidA": 1}))
    with pytest.raises(ValueError, match="expected a pickled list of video id strings"):
        read_qa_dataset("causal_vidqa", split / "train.pkl", None)
    (split / "train.pkl").write_bytes(pickle.dumps(["vidA", "vidA"]))
    with pytest.raises(ValueError, match=r"duplicate question id 'vidA_0'"):
        read_qa_dataset("causal_vidqa", split / "train.pkl", None)


# ---------------------------------------------------------------------------------------------------
# The dispatcher


def test_read_qa_dataset_dispatch(tmp_path: Path) -> None:
    assert set(QA_FORMATS) == {"jsonl", "msrvtt_qa", "msvd_qa", "tgif_qa", "nextqa", "causal_vidqa"}
    with pytest.raises(ValueError, match="unknown QA dataset format 'activitynet_qa'"):
        read_qa_dataset("activitynet_qa", tmp_path / "x.json", None)
    with pytest.raises(FileNotFoundError):
        read_qa_dataset("msrvtt_qa", tmp_path / "missing_qa.json", None)
    with pytest.raises(FileNotFoundError, match="video folder"):
        read_qa_dataset("msrvtt_qa", _msrvtt_qa(tmp_path), tmp_path / "no_videos")


@pytest.mark.parametrize("video", ["../outside", "/etc", "a\\b", "..", "bad\x00id"])
def test_causal_vidqa_split_ids_must_be_plain_folder_names(tmp_path: Path, video: str) -> None:
    split = tmp_path / "split"
    split.mkdir()
    (tmp_path / "QA").mkdir()
    (split / "train.pkl").write_bytes(pickle.dumps(["2VBmRPrfNZY_000000_000010", video]))
    with pytest.raises(AnnotationError, match=r"train\.pkl: entry 2: .* is not a video id"):
        read_qa_dataset("causal_vidqa", split / "train.pkl", None)


def test_tgif_qa_undecodable_bytes_and_bad_pickles_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "Test_frameqa_question.csv"
    path.write_bytes(b"gif_name\tquestion\tanswer\ttype\tvid_id\ttumblr_a\twhat is it\tcaf\xe9\t0\tFrameQA1\n")
    with pytest.raises(AnnotationError, match=rf"^{re.escape(str(path))}: line 1: not UTF-8 text"):
        read_qa_dataset("tgif_qa", path, tmp_path)
    split = tmp_path / "split" / "test.pkl"
    split.parent.mkdir()
    (tmp_path / "QA").mkdir()
    split.write_bytes(b"\x80\x02]q\x00(X\x03\x00\x00\x00abcq\x01h\x05e.")  # a memo that was never stored
    with pytest.raises(AnnotationError, match=r"test\.pkl: not a Causal-VidQA split"):
        read_qa_dataset("causal_vidqa", split, None)
