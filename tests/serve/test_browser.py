"""`mama serve` in a real browser: one server (a subprocess, as users start it) and one headless
Chromium shared by every check. Screenshots of each tab go to a temporary folder, and to docs/img when
MAMA_UPDATE_SCREENSHOTS=1.

Under CI (CI=true) a missing Chromium, Playwright or gradio fails the test instead of skipping it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"
VIEWPORT = {"width": 1280, "height": 1000}


def _require(ok: bool, what: str) -> None:
    if ok:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{what} is missing, and the browser test must run in CI (see .ci/run)")
    pytest.skip(f"{what} is missing")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(
    serve_index: dict[str, Path], tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """`mama serve` starting on a free loopback port, with its own TMPDIR and an empty working directory
    (:func:`page` waits until it answers)."""
    for module in ("gradio", "playwright"):
        try:
            __import__(module)
        except ImportError:
            _require(False, f"the Python package {module}")
    _require(Path(CHROMIUM).is_file(), CHROMIUM)
    work = tmp_path_factory.mktemp("served")
    tmp, cwd = work / "tmp", work / "cwd"
    tmp.mkdir()
    cwd.mkdir()
    port = _free_port()
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    runs = work / "runs"  # serve_runs trains while the server starts; the runs test links it in
    runs.mkdir()
    command = [
        sys.executable, "-m", "mama.cli", "serve", "--index", str(serve_index["index"]), "--model",
        str(serve_index["model"]), "--port", str(port), "--runs", str(runs),
        "--captioner", str(tiny_llava_dir), "--max-upload-mb", "1",
    ]  # fmt: skip
    log = work / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    yield {"url": f"http://127.0.0.1:{port}/", "process": process, "tmp": tmp, "cwd": cwd, "log": log, "runs": runs}
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def page(server: dict[str, Any], serve_runs: Path) -> Iterator[Any]:
    """Chromium on the app, once the server answers (the tiny run trains meanwhile: ``serve_runs``)."""
    from playwright.sync_api import sync_playwright

    (server["runs"] / "tiny_mama").symlink_to(serve_runs / "tiny_mama")
    deadline = time.monotonic() + 120
    while f"mama serve: {server['url']}" not in server["log"].read_text():
        if server["process"].poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"mama serve did not start:\n{server['log'].read_text()}")
        time.sleep(0.2)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(60_000)
        page.outside = []  # requests that would leave the machine
        page.on(
            "request",
            lambda r: None if r.url.startswith((server["url"], "data:", "blob:")) else page.outside.append(r.url),
        )
        page.goto(server["url"])
        yield page
        browser.close()


def _screenshot(page: Any, name: str, tmp_path: Path) -> None:
    # Pop-ups left by the earlier error checks would cover the tab in the README's picture.
    page.evaluate("() => document.querySelectorAll('.toast-wrap').forEach(t => t.style.display = 'none')")
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    page.evaluate("() => document.querySelectorAll('.toast-wrap').forEach(t => t.style.display = '')")
    assert path.stat().st_size > 10_000
    if os.environ.get("MAMA_UPDATE_SCREENSHOTS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, DOCS_IMG / name)


def _images_loaded(page: Any, selector: str) -> int:
    """Scroll every image under ``selector`` into view (gradio loads them lazily), wait until each has
    decoded, and return how many there are."""
    page.wait_for_selector(f"{selector} img")
    page.evaluate(f"() => document.querySelectorAll('{selector} img').forEach(i => i.scrollIntoView())")
    page.wait_for_function(
        f"() => [...document.querySelectorAll('{selector} img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    return page.locator(f"{selector} img").count()


def test_search_tab_shows_strips_scores_and_plays_the_clip(
    page: Any, serve_data: dict[str, Path], tmp_path: Path
) -> None:
    records = [json.loads(line) for line in serve_data["annotations"].read_text().splitlines()]
    record = next(r for r in records if (serve_data["videos"] / f"{r['id']}.mp4").is_file())
    page.get_by_role("tab", name="Search").click()
    page.locator("#query textarea").fill(record["captions"][0]["text"])
    page.locator("#search-button").click()
    page.wait_for_selector("#search-status :text('Top 5 of 12 videos')")
    assert _images_loaded(page, "#results") == 5
    page.wait_for_selector("#player video[src]")
    labels = page.locator("#results .caption-label").all_inner_texts()
    assert len(labels) == 5 and all("score" in label for label in labels)
    assert record["id"] in page.locator("#results-table").inner_text()
    # Clicking the second strip plays its clip.
    first = page.locator("#player video").get_attribute("src")
    page.locator("#results .thumbnail-item").nth(1).click()
    page.wait_for_function(
        f"() => document.querySelector('#player video')?.src && document.querySelector('#player video').src !== {json.dumps(first)}"
    )
    page.locator("#results .thumbnail-item").nth(0).click()
    page.wait_for_function(f"() => document.querySelector('#player video')?.src === {json.dumps(first)}")
    page.evaluate("() => window.scrollTo(0, 0)")
    _screenshot(page, "serve_search.png", tmp_path)


def test_empty_query_shows_an_error_and_the_server_keeps_serving(page: Any) -> None:
    page.get_by_role("tab", name="Search").click()
    page.locator("#query textarea").fill("   ")
    page.locator("#search-button").click()
    page.wait_for_selector("#search-status :text('the query is empty')")
    page.locator("#query textarea").fill("a red circle")
    page.locator("#search-button").click()
    page.wait_for_selector("#search-status :text('Top 5 of 12 videos for a red circle')")


def test_video_query_by_upload_and_a_too_large_upload(page: Any, serve_index: dict[str, Path], tmp_path: Path) -> None:
    page.get_by_role("tab", name="Search").click()
    page.get_by_text("... or find the videos nearest to an uploaded clip").click()
    source = sorted(serve_index["videos"].glob("*.mp4"))[3]
    page.locator("#query-clip input[type=file]").set_input_files(str(source))
    page.wait_for_selector("#query-clip video[src]")
    page.locator("#clip-button").click()
    page.wait_for_selector("#search-status :text('nearest to the uploaded clip')")
    _images_loaded(page, "#results")
    assert page.locator("#results .caption-label").first.inner_text().startswith(f"#1 {source.stem} score 1.000")
    # Over --max-upload-mb: gradio refuses the upload, the page says why, the server keeps serving.
    huge = tmp_path / "huge.mp4"
    huge.write_bytes(bytes(2 * 2**20))
    page.locator("#query-clip button[aria-label='Clear']").click()
    page.locator("#query-clip input[type=file]").set_input_files(str(huge))
    page.wait_for_selector(":text('exceed the maximum allowed size')", timeout=20_000)
    page.locator("#query textarea").fill("a red circle")
    page.locator("#search-button").click()
    page.wait_for_selector("#search-status :text('Top 5 of 12 videos for a red circle')")


def test_caption_tab_shows_keyframes_grid_and_captions(page: Any, tiny_llava_dir: Path, tmp_path: Path) -> None:
    page.get_by_role("tab", name="Caption").click()
    page.locator("#caption-button").click()
    page.wait_for_selector("#caption-status :text('caption(s) of')")
    assert _images_loaded(page, "#keyframes") == 12
    assert _images_loaded(page, "#grid") == 1
    width, height = page.evaluate(
        "() => { const i = document.querySelector('#grid img'); return [i.naturalWidth, i.naturalHeight]; }"
    )
    assert width * 3 == height * 4  # 3 x 4 square tiles
    settings = page.locator("#settings").inner_text()
    assert "temperature" in settings and "max_new_tokens" in settings
    assert page.locator("#captions").inner_text().strip()
    page.evaluate("() => window.scrollTo(0, 0)")
    _screenshot(page, "serve_caption.png", tmp_path)


def test_runs_tab_shows_curves_and_metrics(page: Any, tmp_path: Path) -> None:
    page.get_by_role("tab", name="Runs").click()
    page.get_by_role("button", name="Refresh list").click()  # the run finished after the server started
    page.wait_for_timeout(1000)
    page.locator("#run input").click()
    page.get_by_role("option", name="tiny_mama").click()
    page.wait_for_selector("#run-status :text('Run tiny_mama')")
    for plot in ("#loss-plot", "#curve-plot", "#kinds-plot"):
        assert _images_loaded(page, plot) == 1
    assert "t2v_r1" in page.locator("#metrics").inner_text()
    page.evaluate("() => window.scrollTo(0, 0)")
    _screenshot(page, "serve_runs.png", tmp_path)


def test_the_file_route_serves_nothing_from_the_videos_folders(
    page: Any, server: dict[str, Any], serve_index: dict[str, Path]
) -> None:
    """Clips play from links in the app's temp folder; gradio's file route refuses the videos' own
    folders, so neither an indexed video by its path nor any other file beside it can be fetched."""
    import urllib.error
    import urllib.request

    secret = serve_index["videos"] / ".env"
    secret.write_text("SECRET")
    try:
        for path in (secret, next(serve_index["videos"].glob("*.mp4"))):
            try:
                with urllib.request.urlopen(f"{server['url']}gradio_api/file={path}", timeout=30) as response:
                    status, body = response.status, response.read()
            except urllib.error.HTTPError as error:
                status, body = error.code, b""
            assert status >= 400 and b"SECRET" not in body, (path, status)
    finally:
        secret.unlink()


def test_nothing_left_the_machine_and_stopping_cleans_up(page: Any, server: dict[str, Any]) -> None:
    assert page.outside == []
    page.context.browser.close()  # an open page holds connections that the server would wait for
    process = server["process"]
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0, server["log"].read_text()
    print(f"mama serve stopped {time.monotonic() - start:.1f} s after SIGTERM")
    # The app's temp folder (uploads, strips, the files gradio served) is gone, and nothing was written
    # into the working directory.
    assert list(server["tmp"].iterdir()) == []
    assert list(server["cwd"].iterdir()) == []
