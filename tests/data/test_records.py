"""Tests for mama.data.records: the common record type and its JSONL reader and writer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mama.data.records import AnnotationError, Caption, VideoRecord, read_jsonl, write_jsonl


def _good_line(record_id: str = "a") -> dict:
    return {"id": record_id, "video": f"videos/{record_id}.mp4", "captions": ["a red circle"]}


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    records = [
        VideoRecord(
            id="vid0",
            video=tmp_path / "videos" / "vid0.mp4",
            captions=[Caption("a red circle moves left", "human"), Caption("The video shows...", "lvlm", "vague")],
            meta={"concept": "red circle", "bucket": "head", "attributes": {"shape": "circle"}},
        ),
        VideoRecord(id="vid1", video=tmp_path / "v1.mp4", captions=[Caption("ünïcode", "human")], meta={}),
    ]
    path = write_jsonl(tmp_path / "split.jsonl", [r.to_dict(root=tmp_path) for r in records])
    assert read_jsonl(path) == records
    # relative paths on disk keep the dataset folder relocatable
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[0])["video"] == "videos/vid0.mp4"


def test_defaults_plain_captions_blank_lines_and_root(tmp_path: Path) -> None:
    lines = [
        json.dumps({"video": "clips/x.mp4", "captions": ["plain text", {"text": "gen", "source": "lvlm"}], "k": 1}),
        "",
        "   ",
        json.dumps({"id": "y", "video": "/abs/y.mp4", "captions": [{"text": "t"}]}),
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    x, y = read_jsonl(path)
    assert x.id == "x"  # stem of the video path
    assert x.video == tmp_path / "clips" / "x.mp4"
    assert x.captions == [Caption("plain text", "human", "none"), Caption("gen", "lvlm", "none")]
    assert x.meta == {"k": 1}
    assert y.video == Path("/abs/y.mp4")  # absolute paths ignore root
    assert y.captions == [Caption("t", "human")]

    other_root = tmp_path / "elsewhere"
    assert read_jsonl(path, root=other_root)[0].video == other_root / "clips" / "x.mp4"


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ('{"id": "b", "video": "b.mp4", "captions": ["x"]', "invalid JSON"),
        ('["not", "an", "object"]', "JSON object"),
        (json.dumps({"id": "b", "captions": ["x"]}), '"video"'),
        (json.dumps({"id": "b", "video": "b.mp4", "captions": []}), '"captions"'),
        (json.dumps({"id": "b", "video": "b.mp4"}), '"captions"'),
        (json.dumps({"id": "b", "video": "b.mp4", "captions": [{"text": "x", "source": "robot"}]}), "source 'robot'"),
        (json.dumps({"id": "b", "video": "b.mp4", "captions": [{"text": "x", "noise": "weird"}]}), "noise 'weird'"),
        (json.dumps({"id": "b", "video": "b.mp4", "captions": [{"text": ""}]}), "text"),
        (json.dumps({"id": "b", "video": "b.mp4", "captions": [42]}), "caption"),
        (json.dumps(_good_line("a")), "duplicate id 'a' (first seen on line 1)"),
    ],
)
def test_bad_line_error_names_file_line_and_problem(tmp_path: Path, bad_line: str, problem: str) -> None:
    path = tmp_path / "bad.jsonl"
    # line 1 good, line 2 blank (must still count), line 3 bad
    path.write_text(json.dumps(_good_line("a")) + "\n\n" + bad_line + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert f"{path}:3:" in message
    assert problem in message


def test_write_jsonl_is_atomic_and_byte_stable(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    rows = [{"id": "a", "video": "a.mp4", "captions": ["x"], "z": 1, "b": 2}]
    write_jsonl(path, rows)
    first = path.read_bytes()
    write_jsonl(path, rows)
    assert path.read_bytes() == first
    assert first == b'{"id": "a", "video": "a.mp4", "captions": ["x"], "z": 1, "b": 2}\n'  # key order kept

    # a failure half-way leaves the previous file intact and no temporary file behind
    with pytest.raises(TypeError):
        write_jsonl(path, [{"id": "b"}, {"id": object()}])
    assert path.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_caption_rejects_unknown_source_and_noise() -> None:
    with pytest.raises(ValueError, match="source"):
        Caption("x", "robot")
    with pytest.raises(ValueError, match="noise"):
        Caption("x", "human", "wrong")


def test_lvlm_captions_join_pools_by_id(tmp_path: Path) -> None:
    from mama.data.records import add_lvlm_captions, read_lvlm_captions

    path = tmp_path / "augment.jsonl"
    lines = [
        {"video_id": "v1", "captions": ["a man cooks", "a man cooks"], "model": "llava"},
        {"video_id": "v9", "captions": ["unknown video"]},
        {"video_id": "v1", "captions": ["someone is cooking"]},  # a second shard's line for v1
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"video_id": "v2", "capt')  # killed mid-write
    with pytest.warns(UserWarning, match="truncated last line"):
        captions = read_lvlm_captions(path)
    assert captions == {"v1": ["a man cooks", "someone is cooking"], "v9": ["unknown video"]}
    records = [VideoRecord("v1", tmp_path / "v1.mp4", [Caption("a person prepares food", "human")])]
    added, unknown = add_lvlm_captions(records, captions)
    assert (added, unknown) == (2, ["v9"])
    assert [(c.text, c.source) for c in records[0].captions] == [
        ("a person prepares food", "human"), ("a man cooks", "lvlm"), ("someone is cooking", "lvlm"),
    ]  # fmt: skip


def test_lvlm_caption_file_errors_name_the_line(tmp_path: Path) -> None:
    from mama.data.records import read_lvlm_captions

    path = tmp_path / "bad.jsonl"
    path.write_text('{"video_id": "v1", "captions": "not a list"}\n{"video_id": "v2", "captions": []}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: \"captions\" must be a list"):
        read_lvlm_captions(path)
    with pytest.raises(FileNotFoundError, match="LVLM caption file not found"):
        read_lvlm_captions(tmp_path / "nope.jsonl")


def test_undecodable_bytes_name_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    good = json.dumps(_good_line("a")).encode()
    path.write_bytes(good + b"\n\n" + good.replace(b'"a"', b'"caf\xe9"') + b"\n")  # Latin-1, not UTF-8
    with pytest.raises(AnnotationError, match=rf"^{re.escape(str(path))}: line 3: not UTF-8 text \(invalid"):
        read_jsonl(path)


def test_bom_and_unicode_line_separators_inside_strings_are_read(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    line = {"id": "a", "video": "a.mp4", "captions": ["one\u2028two"]}  # JSON allows U+2028 unescaped
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(line, ensure_ascii=False).encode() + b"\r\n")
    (record,) = read_jsonl(path)
    assert record.captions[0].text == "one\u2028two"


def test_wrong_json_types_are_annotation_errors(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    for line, problem in [("[1, 2]", "expected a JSON object, got list"), ('{"id": 3, "video": "a.mp4", "captions": ["x"]}', '"id" must be'),
                          ("1" * 5000, "invalid JSON"), ("[" * 100000, "invalid JSON")]:  # fmt: skip
        path.write_text(line + "\n", encoding="utf-8")
        with pytest.raises(AnnotationError, match=rf"^{re.escape(str(path))}:1: .*{re.escape(problem)}"):
            read_jsonl(path)
