"""A few lines of every annotation layout the readers take, with video ids in the public benchmarks' formats.

Shared by the readers' tests (every reader finds every video under the name its annotation gives) and
the Hypothesis suite (tests/data/test_reader_properties.py: damaged copies of these files). Videos are
empty files: only the index looks at them.

The ids follow the public releases: DiDeMo ``<flickr id>_<digits>[_<hash>].<ext>`` with the phone and
camcorder extensions its val and test files name (``.mov``, ``.mts``, ``.m2ts``, ``.3g2`` ...) and
names ending in a dot; MSR-VTT ``video<N>``; MSVD ``<YouTube id>_<start>_<end>`` (YouTube ids start with
"-" or contain "_"); ActivityNet ``v_<YouTube id>``; LSMDC ``<movie>_<start>-<end>`` clips whose names
hold dots and commas; TGIF ``tumblr_<...>``; NExT-QA VidOR numbers; Causal-VidQA ``<YouTube id>_<start>_<end>``.
"""

from __future__ import annotations

import csv
import json
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mama.data.datasets import read_dataset
from mama.data.qa_datasets import read_qa_dataset
from mama.data.records import read_lvlm_captions

__all__ = ["CASES", "Case"]


@dataclass
class Case:
    """One reader on one small dataset in its real layout.

    Attributes:
        read: reads the dataset; returns the records (VideoRecord or QARecord).
        files: (file, kind) of every annotation file the reader parses, kind one of "json", "jsonl",
            "csv", "tsv", "text", "pickle": what a damaged copy may look like.
        videos: video id -> the path its record must point at (a file that exists, except where the
            video is absent on purpose: then the expected path).
    """

    read: Callable[[], list[Any]]
    files: list[tuple[Path, str]]
    videos: dict[str, Path]


def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def _json(path: Path, obj: Any, lines: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row) + "\n" for row in obj) if lines else json.dumps(obj)
    path.write_text(text, encoding="utf-8")
    return path


def _table(path: Path, header: list[str] | None, rows: Iterable[list[str]], delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        if delimiter == "\t":  # TGIF-QA and LSMDC: tab-separated, never quoted
            lines = ([header] if header else []) + [list(r) for r in rows]
            f.write("".join("\t".join(cells) + "\n" for cells in lines))
        else:
            writer = csv.writer(f, delimiter=delimiter)
            if header:
                writer.writerow(header)
            writer.writerows(rows)
    return path


# ---------------------------------------------------------------------------------------------------
# Retrieval


def didemo(root: Path) -> Case:
    videos = root / "DiDeMo_Videos"
    present = {
        "10017402@N06_4474468578.mov": "10017402@N06_4474468578.mov",
        "12090392@N02_13482799053_87ef417396.mov": "12090392@N02_13482799053_87ef417396.mp4",  # transcoded
        "28359283@N00_2890011063.mts": "28359283@N00_2890011063.mts",
        "13773567@N08_3127434598.3g2": "phone/13773567@N08_3127434598.3g2",
        "88446593@N00_3539453563.M2TS": "88446593@N00_3539453563.m2ts",  # the extension's case differs
        "12345678@N00_123456.": "12345678@N00_123456.",  # a name that ends in a dot, no extension
        "87654321@N00_654321.": "87654321@N00_654321..mp4",  # ... and transcoded
        "11111111@N00_111111..mov": "11111111@N00_111111..mov",
        "22222222@N00_2222222222_ab12cd34ef.webm": "22222222@N00_2222222222_ab12cd34ef.webm",
    }
    _touch(videos, *present.values(), "33333333@N00_333333.mp4")
    expected = {video_id: videos / name for video_id, name in present.items()}
    # A trailing dot is part of the name: "<id>." is not "<id>.mp4", and is reported missing.
    expected["33333333@N00_333333."] = videos / "33333333@N00_333333..mp4"
    expected["99999999@N00_9999999999.mkv"] = videos / "99999999@N00_9999999999.mkv"  # absent
    moments = [
        {"annotation_id": i, "description": f"moment {i}.", "times": [[0, 1]], "video": video_id, "num_segments": 6}
        for i, video_id in enumerate(expected)
    ]
    path = _json(root / "test_data.json", moments)
    return Case(lambda: read_dataset("didemo", path, videos), [(path, "json")], expected)


def msrvtt_test(root: Path) -> Case:
    videos = root / "MSRVTT_Videos"
    _touch(videos, "TestVideo/video7010.mp4", "video123.m2ts")
    path = _table(
        root / "MSRVTT_JSFUSION_test.csv",
        ["key", "vid_key", "video_id", "sentence"],
        [["ret0", "msr7010", "video7010", "a cartoon, with a dog"], ["ret1", "msr123", "video123", "a man talks"],
         ["ret2", "msr9", "video9", "someone cooks"]],
    )  # fmt: skip
    expected = {"video7010": videos / "TestVideo/video7010.mp4", "video123": videos / "video123.m2ts",
                "video9": videos / "video9.mp4"}  # fmt: skip
    return Case(lambda: read_dataset("msrvtt", path, videos), [(path, "csv")], expected)


def msrvtt_train(root: Path) -> Case:
    videos = root / "MSRVTT_Videos"
    _touch(videos, "TrainValVideo/video0.mp4", "video1.ts")
    sentences = [{"caption": f"caption {i}", "video_id": f"video{i % 2}", "sen_id": i} for i in range(4)]
    data = _json(root / "MSRVTT_data.json", {"info": {}, "videos": [], "sentences": sentences})
    path = _table(root / "MSRVTT_train.9k.csv", ["video_id"], [["video0"], ["video1"]])
    expected = {"video0": videos / "TrainValVideo/video0.mp4", "video1": videos / "video1.ts"}
    return Case(lambda: read_dataset("msrvtt", path, videos), [(path, "csv"), (data, "json")], expected)


def msrvtt_clipvip(root: Path) -> Case:
    videos = root / "videos"
    _touch(videos, "video123.mp4", "video45.mts")
    rows = [
        {"clip_name": "all/video123", "caption": "a man sings"},  # CLIP-ViP writes a folder prefix
        {"clip_name": "video45", "caption": ["a dog runs", "a pet plays"]},
        {"clip_name": "all/video123", "caption": "someone performs"},
    ]
    path = _json(root / "test1ka.jsonl", rows, lines=True)
    expected = {"all/video123": videos / "video123.mp4", "video45": videos / "video45.mts"}
    return Case(lambda: read_dataset("msrvtt_clipvip", path, videos), [(path, "jsonl")], expected)


def activitynet(root: Path) -> Case:
    videos = root / "Activity_Videos"
    _touch(videos, "QOlSCBRmfWY.mkv", "v_--1DO2V4K74.mp4", "-zHX3Gdx6I4.3g2")
    data = {
        video_id: {"duration": 30.5, "timestamps": [[0.0, 5.0], [2.5, 9.0]], "sentences": ["A man runs.", "He stops."]}
        for video_id in ("v_QOlSCBRmfWY", "v_--1DO2V4K74", "v_-zHX3Gdx6I4", "v_absent12345")
    }
    path = _json(root / "val_1.json", data)
    expected = {
        "v_QOlSCBRmfWY": videos / "QOlSCBRmfWY.mkv",
        "v_--1DO2V4K74": videos / "v_--1DO2V4K74.mp4",
        "v_-zHX3Gdx6I4": videos / "-zHX3Gdx6I4.3g2",
        "v_absent12345": videos / "v_absent12345.mp4",
    }
    return Case(lambda: read_dataset("activitynet", path, videos), [(path, "json")], expected)


def msvd(root: Path) -> Case:
    videos = root / "MSVD_Videos"
    _touch(videos, "-4wsuPCjDBc_5_15.avi", "-_aaMGK6GGw_57_61.ogv", "zv2RIbUsnSw_159_165.AVI")
    ids = ["-4wsuPCjDBc_5_15", "-_aaMGK6GGw_57_61", "zv2RIbUsnSw_159_165"]
    captions = root / "raw-captions.pkl"
    captions.write_bytes(pickle.dumps({i: [["a", "squirrel", "eats"], ["it", "eats"]] for i in ids}, protocol=2))
    path = root / "test_list.txt"
    path.write_text("\n".join(ids) + "\n", encoding="utf-8")
    expected = {
        ids[0]: videos / "-4wsuPCjDBc_5_15.avi",
        ids[1]: videos / "-_aaMGK6GGw_57_61.ogv",
        ids[2]: videos / "zv2RIbUsnSw_159_165.AVI",
    }
    return Case(lambda: read_dataset("msvd", path, videos), [(path, "text"), (captions, "pickle")], expected)


def lsmdc(root: Path) -> Case:
    videos = root / "LSMDC_Videos"
    clips = {
        "0001_American_Beauty_00.00.51.926-00.00.54.762": "0001_American_Beauty/{}.avi",
        "1041_This_is_40,_part_1_01.13.22.512-01.13.25.020": "1041_This_is_40,_part_1/{}.avi",
        "3033_HUGO_00.39.01.700-00.39.05.042": "3033_HUGO/{}.mts",
    }
    _touch(videos, *(pattern.format(clip) for clip, pattern in clips.items()))
    times = ["00.00.51.926", "00.00.54.762", "00.00.51.950", "00.00.54.700"]
    rows = [[clip, *times, f"SOMEONE looks, then leaves. ({i})"] for i, clip in enumerate(clips)]
    path = _table(root / "LSMDC16_challenge_1000_publictect.csv", None, rows, delimiter="\t")
    expected = {clip: videos / pattern.format(clip) for clip, pattern in clips.items()}
    return Case(lambda: read_dataset("lsmdc", path, videos), [(path, "tsv")], expected)


def jsonl(root: Path) -> Case:
    videos = root / "videos"
    _touch(videos, "12345678@N00_123456.", "flickr/28359283@N00_2890011063.mts", "video7.mp4")
    rows = [
        {"id": "12345678@N00_123456.", "video": "videos/12345678@N00_123456.", "captions": ["a dot at the end"]},
        {"id": "28359283@N00_2890011063.mts", "video": "28359283@N00_2890011063.mts", "captions": ["a camcorder"]},
        {"id": "video7", "video": "elsewhere/v7.mp4", "captions": [{"text": "by id", "source": "lvlm"}]},
    ]
    path = _json(root / "test.jsonl", rows, lines=True)
    expected = {
        "12345678@N00_123456.": videos / "12345678@N00_123456.",
        "28359283@N00_2890011063.mts": videos / "flickr/28359283@N00_2890011063.mts",
        "video7": videos / "video7.mp4",
    }
    return Case(lambda: read_dataset("jsonl", path, videos), [(path, "jsonl")], expected)


def lvlm_captions(root: Path) -> Case:
    rows = [{"video_id": "12345678@N00_123456.", "captions": ["a man", "a dog"]}, {"video_id": "v1", "captions": []}]
    path = _json(root / "augment.jsonl", rows, lines=True)
    return Case(lambda: list(read_lvlm_captions(path).items()), [(path, "jsonl")], {})


# ---------------------------------------------------------------------------------------------------
# Question answering


def msrvtt_qa(root: Path) -> Case:
    videos = root / "videos"
    _touch(videos, "TestVideo/video7010.mp4", "TrainValVideo/video0.mts")
    entries = [
        {"answer": "cartoon", "category_id": 2, "id": 0, "question": "what is shown?", "video_id": 7010},
        {"answer": "man", "category_id": 13, "id": 1, "question": "who talks?", "video_id": 0},
        {"answer": "night", "category_id": 5, "id": 2, "question": "when is it?", "video_id": 9999},
    ]
    path = _json(root / "test_qa.json", entries)
    expected = {"video7010": videos / "TestVideo/video7010.mp4", "video0": videos / "TrainValVideo/video0.mts",
                "video9999": videos / "video9999.mp4"}  # fmt: skip
    return Case(lambda: read_qa_dataset("msrvtt_qa", path, videos), [(path, "json")], expected)


def msvd_qa(root: Path) -> Case:
    videos = root / "YouTubeClips"
    _touch(videos, "-4wsuPCjDBc_5_15.avi", "vid2.m2ts")
    mapping = root / "youtube_mapping.txt"
    mapping.write_text("-4wsuPCjDBc_5_15 vid1\n-_aaMGK6GGw_57_61 vid2\n", encoding="utf-8")
    entries = [
        {"answer": "squirrel", "id": 0, "question": "what eats?", "video_id": 1},
        {"answer": "dog", "id": 1, "question": "what runs?", "video_id": 2},
    ]
    path = _json(root / "test_qa.json", entries)
    expected = {"-4wsuPCjDBc_5_15": videos / "-4wsuPCjDBc_5_15.avi", "-_aaMGK6GGw_57_61": videos / "vid2.m2ts"}
    return Case(lambda: read_qa_dataset("msvd_qa", path, videos), [(path, "json"), (mapping, "text")], expected)


def tgif_qa(root: Path) -> Case:
    videos = root / "gifs"
    _touch(videos, "tumblr_nk172bbdPI1u1lr18o1_250.mp4", "tumblr_mdg6ssSKAs1qi7mfco1_500.webm")
    header = ["gif_name", "question", "answer", "type", "vid_id", "key", "description"]
    rows = [
        ["tumblr_nk172bbdPI1u1lr18o1_250", 'what is the "man" holding', "guitar", "0", "FrameQA1", "1", "d"],
        ["tumblr_mdg6ssSKAs1qi7mfco1_500", "what color is the car", "red", "2", "FrameQA2", "2", "d"],
        ["tumblr_absent0000000000000_250", "how many dogs", "two", "1", "FrameQA3", "3", "d"],
    ]
    path = _table(root / "Test_frameqa_question.csv", header, rows, delimiter="\t")
    expected = {
        "tumblr_nk172bbdPI1u1lr18o1_250": videos / "tumblr_nk172bbdPI1u1lr18o1_250.mp4",
        "tumblr_mdg6ssSKAs1qi7mfco1_500": videos / "tumblr_mdg6ssSKAs1qi7mfco1_500.webm",
        "tumblr_absent0000000000000_250": videos / "tumblr_absent0000000000000_250.gif",
    }
    return Case(lambda: read_qa_dataset("tgif_qa", path, videos), [(path, "tsv")], expected)


def nextqa(root: Path) -> Case:
    videos = root / "NExTVideo"
    _touch(videos, "1025/4010069381.mp4", "1164/3238737531.m2ts")
    header = ["video", "frame_count", "width", "height", "question", "answer", "qid", "type",
              "a0", "a1", "a2", "a3", "a4"]  # fmt: skip
    rows = [
        ["4010069381", "369", "640", "480", "why did the boy smile", "2", "6", "CW", "a", "b", "c", "d", "e"],
        ["3238737531", "1200", "640", "360", "what did the dog do next", "0", "1", "TN", "a", "b", "c", "d", "e"],
    ]
    path = _table(root / "val.csv", header, rows)
    vidor = _json(root / "map_vid_vidorID.json", {"4010069381": "1025/4010069381", "3238737531": "1164/3238737531"})
    expected = {"4010069381": videos / "1025/4010069381.mp4", "3238737531": videos / "1164/3238737531.m2ts"}
    return Case(lambda: read_qa_dataset("nextqa", path, videos), [(path, "csv"), (vidor, "json")], expected)


def causal_vidqa(root: Path) -> Case:
    vids = ["2VBmRPrfNZY_000000_000010", "-0Ue8i-9aYY_000027_000037"]
    split = root / "split" / "valid.pkl"
    split.parent.mkdir(parents=True, exist_ok=True)
    split.write_bytes(pickle.dumps(vids, protocol=2))
    five = [f"choice {i}" for i in range(5)]
    text = {group: {"question": f"{group}?", "answer": five, **({"reason": five} if group in ("predictive", "counterfactual") else {})}
            for group in ("descriptive", "explanatory", "predictive", "counterfactual")}  # fmt: skip
    answer = {"descriptive": {"answer": 1}, "explanatory": {"answer": 0}, "predictive": {"answer": 1, "reason": 2},
              "counterfactual": {"answer": 0, "reason": 4}}  # fmt: skip
    files: list[tuple[Path, str]] = [(split, "pickle")]
    for vid in vids:
        files.append((_json(root / "QA" / vid / "text.json", text), "json"))
        files.append((_json(root / "QA" / vid / "answer.json", answer), "json"))
    videos = root / "videos"
    _touch(videos, f"{vids[0]}.mp4", f"{vids[1]}.mkv")
    expected = {vids[0]: videos / f"{vids[0]}.mp4", vids[1]: videos / f"{vids[1]}.mkv"}
    return Case(lambda: read_qa_dataset("causal_vidqa", split, videos), files, expected)


def qa_jsonl(root: Path) -> Case:
    videos = root / "videos"
    _touch(videos, "12345678@N00_123456.", "clips/a.MTS", "v2.vob")
    rows = [
        {"id": "q1", "video_id": "12345678@N00_123456.", "question": "what?", "answer": "a"},
        {"id": "q2", "video": "clips/a.mts", "question": "who?", "candidates": ["x", "y"], "answer_index": 1},
        {"id": "q3", "video_id": "v2", "question": "why?", "answer": "b", "qtype": "why"},
    ]
    path = _json(root / "qa_test.jsonl", rows, lines=True)
    expected = {"12345678@N00_123456.": videos / "12345678@N00_123456.", "a": videos / "clips/a.MTS",
                "v2": videos / "v2.vob"}  # fmt: skip
    return Case(lambda: read_qa_dataset("jsonl", path, videos), [(path, "jsonl")], expected)


# Every reader of mama.data.datasets.DATASET_FORMATS and mama.data.qa_datasets.QA_FORMATS, plus the LVLM
# caption files of mama.data.records.
CASES: dict[str, Callable[[Path], Case]] = {
    "didemo": didemo,
    "msrvtt_test": msrvtt_test,
    "msrvtt_train": msrvtt_train,
    "msrvtt_clipvip": msrvtt_clipvip,
    "activitynet": activitynet,
    "msvd": msvd,
    "lsmdc": lsmdc,
    "jsonl": jsonl,
    "lvlm_captions": lvlm_captions,
    "msrvtt_qa": msrvtt_qa,
    "msvd_qa": msvd_qa,
    "tgif_qa": tgif_qa,
    "nextqa": nextqa,
    "causal_vidqa": causal_vidqa,
    "qa_jsonl": qa_jsonl,
}
