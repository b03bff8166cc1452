"""Tests for mama.data.datasets: the benchmark readers and the video index.

Each fixture is a few videos in the real layout (file names, columns, keys) written into tmp_path;
videos are empty placeholder files, since only the index looks at them.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import pytest
from annotation_fixtures import CASES

from mama.data.datasets import DATASET_FORMATS, VIDEO_EXTENSIONS, VideoIndex, read_dataset, split_shortfall
from mama.data.records import AnnotationError, Caption, VideoRecord


def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def _frames(root: Path, name: str, count: int = 3) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"{i:05d}.jpg").touch()
    return folder


def _write_csv(path: Path, header: list[str], rows: Iterable[list[str]], delimiter: str = ",") -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _texts(record: VideoRecord) -> list[str]:
    assert all(c.source == "human" and c.noise == "none" for c in record.captions)
    return [c.text for c in record.captions]


# ---------------------------------------------------------------------------------------------------
# VideoIndex


def test_index_finds_nested_videos_frame_folders_and_ids_with_extensions(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    _touch(videos, "a.mp4", "sub/deeper/b.AVI", "c.webm", "flickr1.mov", "flickr2.m4v.mp4", ".hidden.mp4", "notes.txt")
    frames = _frames(videos, "frames/d")
    _touch(videos, ".cache/e.mp4")  # hidden folders are skipped

    index = VideoIndex(videos)
    assert len(index) == 6
    assert index.resolve("a") == videos / "a.mp4"
    assert index.resolve("b") == videos / "sub/deeper/b.AVI"
    assert index.resolve("d") == frames
    assert index.resolve("flickr1.mov") == videos / "flickr1.mov"
    # A transcoded copy keeps the original name in its stem: the id as written is tried first.
    assert index.resolve("flickr2.m4v") == videos / "flickr2.m4v.mp4"
    assert index.resolve("all/c") == videos / "c.webm"  # folder prefixes (CLIP-ViP ids) are ignored
    assert "a" in index and "e" not in index and ".hidden" not in index
    assert ".mp4" in VIDEO_EXTENSIONS and ".m4v" in VIDEO_EXTENSIONS


def test_index_missing_video_gets_expected_path(tmp_path: Path) -> None:
    index = VideoIndex(tmp_path)
    assert index.find("nope") is None
    assert index.resolve("nope") == tmp_path / "nope.mp4"
    assert index.resolve("nope.avi") == tmp_path / "nope.avi"
    assert index.resolve_first(["v_x", "x"]) == tmp_path / "v_x.mp4"


def test_index_duplicates_prefer_video_files_then_shortest_path_and_warn_once(tmp_path: Path) -> None:
    _touch(tmp_path, "deep/er/x.mp4", "x.avi", "y/y.mp4", "z/long_folder/z.mp4", "z/s/z.mp4")
    _frames(tmp_path, "frames/y")
    with pytest.warns(UserWarning, match="3 video ids occur more than once") as caught:
        index = VideoIndex(tmp_path)
    assert len(caught) == 1
    assert index.resolve("x") == tmp_path / "x.avi"
    assert index.resolve("y") == tmp_path / "y/y.mp4"  # a video file beats a frame folder
    assert index.resolve("z") == tmp_path / "z/s/z.mp4"


def test_index_survives_symlink_loops_and_rejects_missing_root(tmp_path: Path) -> None:
    _touch(tmp_path, "movie/clip.avi")
    os.symlink(tmp_path, tmp_path / "movie" / "loop")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert VideoIndex(tmp_path).resolve("clip") == tmp_path / "movie/clip.avi"
    with pytest.raises(FileNotFoundError, match="absent"):
        VideoIndex(tmp_path / "absent")


def test_unknown_format_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset format 'webvid'.*msrvtt.*lsmdc"):
        read_dataset("webvid", tmp_path / "x.json", None)
    assert set(DATASET_FORMATS) == {"jsonl", "msrvtt", "msrvtt_clipvip", "didemo", "activitynet", "msvd", "lsmdc"}


# ---------------------------------------------------------------------------------------------------
# MSR-VTT (CLIP4Clip layout)


@pytest.fixture
def msrvtt(tmp_path: Path) -> Path:
    root = tmp_path / "msrvtt_data"
    root.mkdir()
    _touch(tmp_path / "MSRVTT_Videos", "video0.mp4", "video1.mp4", "video7579.mp4")
    data = {
        "info": {"year": "2016"},
        "videos": [{"video_id": f"video{i}", "category": 9, "url": "u", "split": "train", "id": i} for i in (0, 1, 2)],
        "sentences": [
            {"caption": "a man drives a car", "video_id": "video0", "sen_id": 0},
            {"caption": "a cartoon cat runs", "video_id": "video1", "sen_id": 1},
            {"caption": "a car moves down a road", "video_id": "video0", "sen_id": 2},
            {"caption": "someone talks", "video_id": "video2", "sen_id": 3},
        ],
    }
    (root / "MSRVTT_data.json").write_text(json.dumps(data), encoding="utf-8")
    _write_csv(root / "MSRVTT_train.9k.csv", ["video_id"], [["video0"], ["video1"], ["video2"]])
    _write_csv(
        root / "MSRVTT_JSFUSION_test.csv",
        ["key", "vid_key", "video_id", "sentence"],
        [["ret0", "msr7579", "video7579", "a girl wearing red top and black trouser is putting a sweater on a dog"],
         ["ret1", "msr7725", "video7725", "young people sit around the edges of a room, clapping"]],
    )  # fmt: skip
    return root


def test_msrvtt_train_pools_all_captions_per_video(msrvtt: Path) -> None:
    videos = msrvtt.parent / "MSRVTT_Videos"
    records = read_dataset("msrvtt", msrvtt / "MSRVTT_train.9k.csv", videos)
    assert [r.id for r in records] == ["video0", "video1", "video2"]
    assert _texts(records[0]) == ["a man drives a car", "a car moves down a road"]
    assert _texts(records[1]) == ["a cartoon cat runs"]
    assert records[0].video == videos / "video0.mp4"
    assert records[2].video == videos / "video2.mp4" and not records[2].video.exists()  # reported later


def test_msrvtt_1ka_is_one_caption_per_row(msrvtt: Path) -> None:
    records = read_dataset("msrvtt", msrvtt / "MSRVTT_JSFUSION_test.csv", msrvtt.parent / "MSRVTT_Videos")
    assert [r.id for r in records] == ["video7579", "video7725"]
    assert [len(r.captions) for r in records] == [1, 1]
    assert _texts(records[1]) == ["young people sit around the edges of a room, clapping"]  # quoted comma
    assert records[0].meta == {"key": "ret0", "vid_key": "msr7579"}


def test_msrvtt_errors_name_the_file(msrvtt: Path) -> None:
    (msrvtt / "MSRVTT_data.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{msrvtt / 'MSRVTT_data.json'}"):
        read_dataset("msrvtt", msrvtt / "MSRVTT_train.9k.csv", None)
    # The 1k-A test needs no auxiliary file.
    assert len(read_dataset("msrvtt", msrvtt / "MSRVTT_JSFUSION_test.csv", None)) == 2

    bad = _write_csv(msrvtt / "bad.csv", ["key", "video_id", "sentence"], [["r0", "video0", "x"], ["r1", "video1"]])
    with pytest.raises(ValueError, match=r"bad\.csv: line 3: expected 3 columns"):
        read_dataset("msrvtt", bad, None)
    dup = _write_csv(msrvtt / "dup.csv", ["video_id", "sentence"], [["video0", "x"], ["video0", "y"]])
    with pytest.raises(ValueError, match=r"dup\.csv: line 3: duplicate video id 'video0' \(first at line 2\)"):
        read_dataset("msrvtt", dup, None)
    other = _write_csv(msrvtt / "other.csv", ["clip"], [["video0"]])
    with pytest.raises(ValueError, match="expected a 'video_id' column"):
        read_dataset("msrvtt", other, None)


# ---------------------------------------------------------------------------------------------------
# MSR-VTT (CLIP-ViP / ClipBERT layout)


def test_msrvtt_clipvip_groups_by_clip_in_jsonl_and_json(tmp_path: Path) -> None:
    _touch(tmp_path / "videos", "video0.mp4", "video1.mp4", "video2.mp4")
    lines = [
        {"caption": "a man drives a car", "clip_name": "video0", "sen_id": 0},
        {"caption": "a cartoon cat runs", "clip_name": "video1", "sen_id": 1},
        {"caption": "a car moves down a road", "clip_name": "video0", "sen_id": 2},
        {"caption": ["a chef cooks", "food is prepared"], "clip_name": "video2"},
    ]
    train = tmp_path / "train9k.jsonl"
    train.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")
    records = read_dataset("msrvtt_clipvip", train, tmp_path / "videos")
    assert [r.id for r in records] == ["video0", "video1", "video2"]
    assert _texts(records[0]) == ["a man drives a car", "a car moves down a road"]
    assert _texts(records[2]) == ["a chef cooks", "food is prepared"]
    assert records[1].video == tmp_path / "videos" / "video1.mp4"

    test = tmp_path / "test1ka.json"
    test.write_text(json.dumps([{"clip_id": "video1", "text": "a cartoon cat runs"}]), encoding="utf-8")
    (record,) = read_dataset("msrvtt_clipvip", test, tmp_path / "videos")
    assert (record.id, _texts(record)) == ("video1", ["a cartoon cat runs"])

    train.write_text(json.dumps(lines[0]) + "\n" + '{"clip_name": "video1", "caption": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"train9k\.jsonl: line 2: 'caption' must be str or list"):
        read_dataset("msrvtt_clipvip", train, None)
    train.write_text(json.dumps(lines[0]) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train9k\.jsonl: line 2: invalid JSON"):
        read_dataset("msrvtt_clipvip", train, None)


# ---------------------------------------------------------------------------------------------------
# DiDeMo


def test_didemo_joins_descriptions_into_a_paragraph(tmp_path: Path) -> None:
    videos = tmp_path / "DiDeMo_Videos"
    _touch(videos, "10015567@N08_3655084291_d8b58466fa.mp4", "11141012@N04_2498296025_5a5c3d2e1d.m4v")
    moments = [
        {"annotation_id": 1, "description": "a girl jumps.", "times": [[0, 0], [0, 1]],
         "video": "10015567@N08_3655084291_d8b58466fa.mov", "num_segments": 6},
        {"annotation_id": 2, "description": "a dog barks ", "times": [[2, 2]],
         "video": "11141012@N04_2498296025_5a5c3d2e1d.m4v", "num_segments": 6},
        {"annotation_id": 3, "description": "the girl falls down.", "times": [[3, 4]],
         "video": "10015567@N08_3655084291_d8b58466fa.mov", "num_segments": 6},
        {"annotation_id": 4, "description": "a bird flies.", "times": [[1, 1]],
         "video": "missing_one.avi", "num_segments": 6},
    ]  # fmt: skip
    path = tmp_path / "test_data.json"
    path.write_text(json.dumps(moments), encoding="utf-8")
    records = read_dataset("didemo", path, videos)
    assert [r.id for r in records] == [
        "10015567@N08_3655084291_d8b58466fa.mov",
        "11141012@N04_2498296025_5a5c3d2e1d.m4v",
        "missing_one.avi",
    ]
    assert _texts(records[0]) == ["a girl jumps. the girl falls down."]
    assert records[0].meta == {"num_sentences": 2}
    assert _texts(records[1]) == ["a dog barks"]
    assert records[0].video == videos / "10015567@N08_3655084291_d8b58466fa.mp4"  # transcoded .mov
    assert records[1].video == videos / "11141012@N04_2498296025_5a5c3d2e1d.m4v"
    assert records[2].video == videos / "missing_one.avi"

    moments[2] = {"video": "x.mp4", "times": [[0, 0]]}
    path.write_text(json.dumps(moments), encoding="utf-8")
    with pytest.raises(ValueError, match=r"test_data\.json: entry 2: missing 'description'"):
        read_dataset("didemo", path, videos)


# ---------------------------------------------------------------------------------------------------
# ActivityNet Captions


def test_activitynet_paragraph_in_timestamp_order_and_v_prefix(tmp_path: Path) -> None:
    videos = tmp_path / "Activity_Videos"
    _touch(videos, "v_QOlSCBRmfWY.mp4", "ehGHCYKzyZ8.mkv")
    _frames(videos, "v_nwznKOuZM7w")
    data = {
        "v_QOlSCBRmfWY": {
            "duration": 82.73,
            "timestamps": [[17.37, 60.81], [0.83, 19.86], [56.26, 79.42]],
            "sentences": [
                " The girl dances around the room while the camera captures her movements.",
                "A young woman is seen standing in a room and leads into her dancing. ",
                "She continues dancing around the room and ends by laying on the floor.",
            ],
        },
        "v_ehGHCYKzyZ8": {"duration": 61.72, "timestamps": [[0, 7.1]], "sentences": ["Two men play pool."]},
        "v_nwznKOuZM7w": {"duration": 30.0, "timestamps": [[0, 30]], "sentences": ["A boy rides a bike."]},
        "v_absentVideo": {"duration": 10.0, "timestamps": [[0, 5]], "sentences": ["Nothing here."]},
    }
    path = tmp_path / "val_1.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    records = read_dataset("activitynet", path, videos)
    assert [r.id for r in records] == list(data)
    paragraph = (
        "A young woman is seen standing in a room and leads into her dancing. "
        "The girl dances around the room while the camera captures her movements. "
        "She continues dancing around the room and ends by laying on the floor."
    )
    assert _texts(records[0]) == [paragraph]
    assert records[0].meta == {"duration": 82.73, "num_sentences": 3}
    assert records[0].video == videos / "v_QOlSCBRmfWY.mp4"
    assert records[1].video == videos / "ehGHCYKzyZ8.mkv"  # downloaded without the "v_" prefix
    assert records[2].video == videos / "v_nwznKOuZM7w"  # a frame folder
    assert records[3].video == videos / "v_absentVideo.mp4"

    data["v_ehGHCYKzyZ8"]["timestamps"] = []
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=r"val_1\.json: video 'v_ehGHCYKzyZ8': 1 sentences but 0 timestamps"):
        read_dataset("activitynet", path, videos)


# ---------------------------------------------------------------------------------------------------
# MSVD


@pytest.fixture
def msvd(tmp_path: Path) -> Path:
    root = tmp_path / "msvd_data"
    root.mkdir()
    captions = {
        "-4wsuPCjDBc_5_15": [["a", "squirrel", "is", "eating", "a", "peanut"], ["a", "chipmunk", "eats"]],
        "-7KMZQEsJW4_205_208": [["a", "woman", "is", "slicing", "a", "tomato"]],
        "-8y1Q0rA3n8_108_115": [["a", "man", "plays", "a", "guitar"], ["someone", "plays", "music"]],
    }
    (root / "raw-captions.pkl").write_bytes(pickle.dumps(captions, protocol=2))
    (root / "test_list.txt").write_text(
        "-4wsuPCjDBc_5_15\n-7KMZQEsJW4_205_208\n\n-8y1Q0rA3n8_108_115\n", encoding="utf-8"
    )
    videos = tmp_path / "MSVD_Videos"
    _touch(videos, "-4wsuPCjDBc_5_15.avi", "-7KMZQEsJW4_205_208.avi")
    _frames(videos, "-8y1Q0rA3n8_108_115")
    return root


def test_msvd_keeps_every_caption_per_video(msvd: Path) -> None:
    videos = msvd.parent / "MSVD_Videos"
    records = read_dataset("msvd", msvd / "test_list.txt", videos)
    assert [r.id for r in records] == ["-4wsuPCjDBc_5_15", "-7KMZQEsJW4_205_208", "-8y1Q0rA3n8_108_115"]
    assert _texts(records[0]) == ["a squirrel is eating a peanut", "a chipmunk eats"]
    assert records[0].video == videos / "-4wsuPCjDBc_5_15.avi"
    assert records[2].video == videos / "-8y1Q0rA3n8_108_115"  # frame folder


def test_msvd_errors(msvd: Path) -> None:
    (msvd / "val_list.txt").write_text("-4wsuPCjDBc_5_15\nunknown_1_2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"val_list\.txt: line 2: video 'unknown_1_2' has no caption list"):
        read_dataset("msvd", msvd / "val_list.txt", None)
    (msvd / "raw-captions.pkl").unlink()
    with pytest.raises(FileNotFoundError, match=f"{msvd / 'raw-captions.pkl'}"):
        read_dataset("msvd", msvd / "test_list.txt", None)


class _Exploit:
    """Unpickling this would create a folder: proof that code ran."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (str(self.target),))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_msvd_refuses_a_malicious_pickle(msvd: Path, protocol: int) -> None:
    marker = msvd / "pwned"
    payload = {"-4wsuPCjDBc_5_15": [["a", "squirrel"]], "x": _Exploit(marker)}
    (msvd / "raw-captions.pkl").write_bytes(pickle.dumps(payload, protocol=protocol))
    with pytest.raises(ValueError, match=r"raw-captions\.pkl: not a captions pickle: refusing to load .*mkdir"):
        read_dataset("msvd", msvd / "test_list.txt", None)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# LSMDC


def test_lsmdc_tab_separated_nested_videos_and_merged_repeats(tmp_path: Path) -> None:
    videos = tmp_path / "LSMDC_Videos"
    clip_a = "0001_American_Beauty_00.00.51.926-00.00.54.202"
    clip_b = "0001_American_Beauty_00.01.00.120-00.01.03.505"
    clip_c = "1004_Juno_00.00.32.009-00.00.36.580"
    _touch(
        videos, f"0001_American_Beauty/{clip_a}.avi", f"0001_American_Beauty/{clip_b}.avi", f"1004_Juno/{clip_c}.avi"
    )
    rows = [
        [clip_a, "00.00.51.926", "00.00.54.202", "00.00.51.950", "00.00.54.200", "SOMEONE gazes at the stars."],
        [clip_b, "00.01.00.120", "00.01.03.505", "00.01.00.100", "00.01.03.500", "SOMEONE walks in."],
        [clip_a, "00.00.51.926", "00.00.54.202", "00.00.51.950", "00.00.54.200", "The stars shine."],
        [clip_c, "00.00.32.009", "00.00.36.580", "00.00.32.000", "00.00.36.600", "SOMEONE drinks juice."],
    ]
    path = tmp_path / "LSMDC16_annos_training.csv"
    path.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")
    records = read_dataset("lsmdc", path, videos)
    assert [r.id for r in records] == [clip_a, clip_b, clip_c]
    assert _texts(records[0]) == ["SOMEONE gazes at the stars.", "The stars shine."]
    assert records[0].video == videos / "0001_American_Beauty" / f"{clip_a}.avi"
    assert records[2].video == videos / "1004_Juno" / f"{clip_c}.avi"
    assert records[1].meta == {
        "start_aligned": "00.01.00.120",
        "end_aligned": "00.01.03.505",
        "start_extracted": "00.01.00.100",
        "end_extracted": "00.01.03.500",
    }

    path.write_text("\t".join(rows[0]) + "\n" + f"{clip_b}\t00.01.00.120\tSOMEONE walks in.\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"LSMDC16_annos_training\.csv: line 2: expected 6 tab-separated columns"):
        read_dataset("lsmdc", path, videos)


# ---------------------------------------------------------------------------------------------------
# Our JSONL


def test_jsonl_paths_relative_or_resolved_in_a_videos_folder(tmp_path: Path) -> None:
    lines = [
        {"id": "a", "video": "videos/train/a.mp4", "captions": ["red circle", {"text": "a shape", "source": "lvlm"}]},
        {"video": "videos/train/b.mp4", "captions": ["blue square"]},
        {"id": "c", "video": "elsewhere/c_file.mp4", "captions": ["green cross"]},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    a, b, c = read_dataset("jsonl", path, None)
    assert a.video == tmp_path / "videos/train/a.mp4"
    assert a.captions[1] == Caption("a shape", "lvlm")  # our format keeps its caption sources

    flat = tmp_path / "flat"
    _touch(flat, "a.mp4", "b.webm")
    _frames(flat, "c")
    a, b, c = read_dataset("jsonl", path, flat)
    assert (a.video, b.video, c.video) == (flat / "a.mp4", flat / "b.webm", flat / "c")  # c: by id
    (flat / "a.mp4").unlink()
    assert read_dataset("jsonl", path, flat)[0].video == flat / "a.mp4"  # expected path, loader skips it


def test_blank_captions_are_dropped_with_one_warning_and_a_clip_needs_one(tmp_path: Path) -> None:
    path = tmp_path / "LSMDC16_annos_val.csv"
    times = ["00.00.01.000", "00.00.02.000", "00.00.01.000", "00.00.02.000"]
    lines = [["m_clip1", *times, "SOMEONE smiles."], ["m_clip1", *times, "  "], ["m_clip2", *times, "SOMEONE runs."]]
    path.write_text("".join("\t".join(row) + "\n" for row in lines), encoding="utf-8")
    with pytest.warns(UserWarning, match="ignored 1 blank captions"):
        records = read_dataset("lsmdc", path, tmp_path)
    assert [_texts(r) for r in records] == [["SOMEONE smiles."], ["SOMEONE runs."]]

    path.write_text("\t".join(["m_clip3", *times, ""]) + "\n", encoding="utf-8")
    with (
        pytest.warns(UserWarning),
        pytest.raises(ValueError, match=r"line 1: video 'm_clip3' has no non-blank caption"),
    ):
        read_dataset("lsmdc", path, tmp_path)


# ---------------------------------------------------------------------------------------------------
# The ids of the public annotation files, and damaged annotation files, for every reader


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_reader_finds_every_video_under_the_name_its_annotation_gives(name: str, tmp_path: Path) -> None:
    case = CASES[name](tmp_path)
    records = case.read()
    if not case.videos:
        assert records  # a caption file: no videos to find
        return
    found = {getattr(r, "video_id", r.id): r.video for r in records}  # QARecord: per question, by video id
    assert found == case.videos


def test_index_takes_an_id_that_names_a_file_as_it_is(tmp_path: Path) -> None:
    _touch(
        tmp_path,
        "12345678@N00_123456.",  # DiDeMo names ending in a dot
        "23456789@N00_234567..mp4",
        "28359283@N00_2890011063.mts",  # extensions outside the usual few
        "sub/88446593@N00_3539453563.M2TS",
        "13773567@N08_3127434598.3g2",
        "a.mov",
        "a.mov.mp4",
        "b.mp4",
        "c.mp4",
        "notes.txt",
    )
    index = VideoIndex(tmp_path)
    assert index.find("12345678@N00_123456.") == tmp_path / "12345678@N00_123456."
    assert index.find("23456789@N00_234567.") == tmp_path / "23456789@N00_234567..mp4"  # the id plus an extension
    assert index.find("28359283@N00_2890011063.mts") == tmp_path / "28359283@N00_2890011063.mts"
    assert index.find("28359283@N00_2890011063") == tmp_path / "28359283@N00_2890011063.mts"
    assert index.find("88446593@N00_3539453563.m2ts") == tmp_path / "sub/88446593@N00_3539453563.M2TS"  # any case
    assert index.find("13773567@N08_3127434598.3G2") == tmp_path / "13773567@N08_3127434598.3g2"
    assert index.find("a.mov") == tmp_path / "a.mov"  # the file named, not the transcoded copy next to it
    assert index.find("b.mov") == tmp_path / "b.mp4"  # a transcoded copy under the plain name
    assert index.find("c.") is None  # a trailing dot is part of the name, never dropped
    assert index.resolve("c.") == tmp_path / "c..mp4"
    assert index.resolve("x.mts") == tmp_path / "x.mts"  # an absent id keeps its own extension
    assert "notes" not in index and len(index) == 8  # videos only: not the extensionless file, nor notes.txt
    assert {".mts", ".m2ts", ".3g2", ".ts", ".ogv", ".vob"} <= set(VIDEO_EXTENSIONS)


def _break_utf8(data: bytes) -> tuple[bytes, int]:
    """``data`` with a byte that is never UTF-8 put in its second line (or the middle of its only one)."""
    newline = data.find(b"\n")
    at = newline + 1 if 0 <= newline < len(data) - 1 else len(data) // 2
    return data[:at] + b"\xff" + data[at:], data.count(b"\n", 0, at) + 1


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_reader_names_file_and_line_of_undecodable_bytes(name: str, tmp_path: Path) -> None:
    case = CASES[name](tmp_path)
    for path, kind in case.files:
        if kind == "pickle":
            continue
        valid = path.read_bytes()
        broken, line = _break_utf8(valid)
        path.write_bytes(broken)
        with pytest.raises(AnnotationError, match=rf"^{re.escape(str(path))}: line {line}: not UTF-8 text"):
            case.read()
        path.write_bytes(valid)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize(
    "content",
    [b"[1, 2]", b'{"a": 1}', b'"text"', b"42", b"null", b"[[]]", b'{"x": [1.5, null]}\n[]\n', b"\x80\x03K\x01.", b""],
)
def test_every_reader_reports_wrong_types_and_garbage_as_annotation_errors(
    name: str, content: bytes, tmp_path: Path
) -> None:
    case = CASES[name](tmp_path)
    for path, _ in case.files:
        valid = path.read_bytes()
        path.write_bytes(content)
        try:
            case.read()
        except AnnotationError as err:  # naming the file it is about (the damaged one, or one that refers to it)
            assert any(str(err).startswith(f"{file}:") for file, _ in case.files), err
        except FileNotFoundError as err:  # a damaged split of Causal-VidQA names videos without a QA/ folder
            assert str(tmp_path) in str(err)
        path.write_bytes(valid)


def test_split_shortfall_states_the_protocol_count(tmp_path: Path) -> None:
    annotation = tmp_path / "MSRVTT_JSFUSION_test.csv"
    assert split_shortfall("msrvtt", "test", annotation, 1000, 1000) is None
    assert split_shortfall("didemo", "test", annotation, 1037, 1037) is None  # no fixed protocol count here
    assert split_shortfall("msrvtt", "test", annotation, 1000, 973) == (
        f"test: evaluating on 973 of the 1000 videos listed in {annotation} (27 missing or unreadable, skipped); "
        "the MSR-VTT 1k-A test protocol has 1000, so these numbers are not comparable with published ones"
    )
    message = split_shortfall("didemo", "test", annotation, 1037, 995)
    assert (
        message
        == f"test: evaluating on 995 of the 1037 videos listed in {annotation} (42 missing or unreadable, skipped)"
    )
    assert "protocol has 670" in str(split_shortfall("msvd", "test", annotation, 700, 700))  # a different list
    assert split_shortfall("msvd", "val", annotation, 100, 100) is None
    assert "4917" in str(split_shortfall("activitynet", "test", annotation, 4917, 4900))
