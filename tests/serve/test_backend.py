"""The app's request handlers called directly (no gradio, no browser): bad input gives a message in the
page and writes nothing outside the app's temp folder; good input gives real results."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from mama.serve.backend import ERROR_PREFIX, ServeBackend
from mama.serve.runs import find_runs

pytestmark = pytest.mark.slow


def _files(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` outside ``skip``: {path: (size, mtime_ns)}."""
    return {
        str(path): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in root.rglob("*")
        if path.is_file() and not path.is_relative_to(skip)
    }


@pytest.fixture(scope="module")
def backend(
    serve_data: dict[str, Path], tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> ServeBackend:
    temp = tmp_path_factory.mktemp("serve_temp")
    return ServeBackend(
        serve_data["index"], serve_data["model"], temp, serve_data["runs"], [str(tiny_llava_dir)], 256 * 1024
    )


@pytest.fixture
def watched(serve_data: dict[str, Path], backend: ServeBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Runs the test in an empty working directory and checks afterwards that no file outside the app's
    temp folder appeared or changed (the videos, the index, the runs, the working directory)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    roots = [serve_data["videos"].parent, cwd]
    before = [_files(root, backend.temp_dir) for root in roots]
    yield
    assert [_files(root, backend.temp_dir) for root in roots] == before
    assert not any(cwd.iterdir())


def _upload(backend: ServeBackend, name: str, data: bytes | Path) -> str:
    """A file where gradio puts uploads: inside the app's temp folder."""
    path = backend.temp_dir / "uploads" / name
    path.parent.mkdir(exist_ok=True)
    if isinstance(data, Path):
        shutil.copy(data, path)
    else:
        path.write_bytes(data)
    return str(path)


def _error(outputs: tuple) -> str:
    """The status of a refused request; every other output is empty."""
    *rest, status = outputs
    assert status.startswith(ERROR_PREFIX), status
    assert all(value is None for value in rest)
    return status.removeprefix(ERROR_PREFIX)


def test_text_search_returns_strips_clip_and_scores(
    serve_data: dict[str, Path], backend: ServeBackend, watched: None
) -> None:
    records = [json.loads(line) for line in serve_data["annotations"].read_text().splitlines()]
    indexed = {p.stem for p in serve_data["videos"].glob("*.mp4")}
    found = 0
    for record in [r for r in records if r["id"] in indexed]:
        gallery, clip, table, videos, status = backend.on_search_text(record["captions"][0]["text"], 3)
        assert status.startswith("Top 3 of 12 videos")
        assert len(gallery) == len(table) == len(videos) == 3
        for strip, label in gallery:
            assert Path(strip).is_relative_to(backend.temp_dir) and Path(strip).stat().st_size > 0
            assert "score" in label
        # The clip plays from a link in the temp folder, never from the videos' own folder (gradio would
        # then have to serve that whole folder), with the bytes of the top hit.
        assert Path(clip).is_relative_to(backend.temp_dir)
        assert Path(videos[0]).is_relative_to(serve_data["videos"].resolve())
        assert Path(clip).read_bytes() == Path(videos[0]).read_bytes()
        scores = [row[2] for row in table]
        assert scores == sorted(scores, reverse=True)
        found += record["id"] in [row[1] for row in table]
    assert found >= 0.75 * len(indexed), f"own video in the top 3 for only {found} of {len(indexed)} captions"


@pytest.mark.parametrize("query", ["", "   ", None])
def test_empty_query_is_refused(backend: ServeBackend, watched: None, query: str | None) -> None:
    assert "the query is empty" in _error(backend.on_search_text(query, 5))


def test_video_query_finds_the_same_video_first(
    serve_data: dict[str, Path], backend: ServeBackend, watched: None
) -> None:
    source = sorted(serve_data["videos"].glob("*.mp4"))[4]
    _, _, table, _, status = backend.on_search_video(_upload(backend, "query.mp4", source), 5)
    assert "nearest to the uploaded clip" in status
    assert table[0][1] == source.stem and table[0][2] > 0.999


def test_corrupt_upload_is_refused(backend: ServeBackend, watched: None) -> None:
    upload = _upload(backend, "corrupt.mp4", b"\x00\x00\x00\x18ftypmp42" + os.urandom(4000))
    with pytest.warns(UserWarning, match="skipping video"):
        assert "corrupt.mp4: cannot be decoded as a video" in _error(backend.on_search_video(upload, 5))
    assert "corrupt.mp4: cannot be decoded as a video" in _error(backend.on_caption(None, upload, 0, "", 1, 0.0, 8, 0))
    assert "not one of the captioning models" in _error(backend.on_caption(None, upload, 7, "", 1, 0.0, 8, 0))


def test_huge_upload_is_refused_before_decoding(backend: ServeBackend, watched: None) -> None:
    upload = _upload(backend, "huge.mp4", b"\x00" * (300 * 1024))  # the backend's limit is 256 KiB
    assert "huge.mp4: 0.293 MB, over the upload limit of 0.25 MB" in _error(backend.on_search_video(upload, 5))
    assert "over the upload limit" in _error(backend.on_caption(None, upload, 0, "", 1, 0.0, 8, 0))


def test_upload_path_outside_the_temp_folder_is_refused(
    serve_data: dict[str, Path], backend: ServeBackend, watched: None
) -> None:
    video = sorted(serve_data["videos"].glob("*.mp4"))[0]
    assert "not an upload of this app" in _error(backend.on_search_video(str(video), 5))
    escape = str(backend.temp_dir / ".." / video.name)
    assert "not an upload of this app" in _error(backend.on_search_video(escape, 5))


def test_paths_outside_the_index_folders_are_refused(
    serve_data: dict[str, Path], backend: ServeBackend, tmp_path: Path, watched: None
) -> None:
    outside = tmp_path / "secret.mp4"
    shutil.copy(sorted(serve_data["videos"].glob("*.mp4"))[0], outside)
    videos = serve_data["videos"]
    link = videos / "link_to_secret.mp4"
    link.symlink_to(outside)  # inside the folder, but resolves outside it
    try:
        for path in ["/etc/passwd", str(outside), f"{videos}/../../../etc/passwd", str(link)]:
            message = _error(backend.on_caption(path, None, 0, "", 1, 0.0, 8, 0))
            assert "not inside the folders of the index's videos" in message, path
        assert "pick an indexed video" in _error(backend.on_caption("", None, 0, "", 1, 0.0, 8, 0))
        assert "not inside" in _error(backend.on_select_hit(["/etc/passwd"], 0))
        assert "no such result" in _error(backend.on_select_hit([], 3))
    finally:
        link.unlink()


def test_runs_tab_draws_a_mama_run_and_refuses_other_folders(
    serve_data: dict[str, Path], backend: ServeBackend, watched: None
) -> None:
    assert backend.run_choices() == find_runs(serve_data["runs"]) == ["tiny_mama"]
    loss, curve, by_kind, metrics, status = backend.on_run("tiny_mama")
    assert not status.startswith(ERROR_PREFIX), status
    assert loss.axes[0].get_lines() and curve.axes[0].get_lines() and by_kind.axes[0].get_lines()
    # the weight-per-kind figure has one line per caption noise kind and source seen in training
    labels = {line.get_label() for line in by_kind.axes[0].get_lines()}
    assert {"noise: clean", "noise: hallucinated", "noise: vague", "source: human", "source: lvlm"} <= labels
    assert dict((row[0], row[1]) for row in metrics)["steps"] == 30
    for name in ["../..", "tiny_mama/../..", "/etc", "", "tiny_mama/checkpoints"]:
        assert _error(backend.on_run(name))
