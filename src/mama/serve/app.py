"""``mama serve``: a local gradio app to browse an index, caption videos and look at training runs.

Three tabs, each wired to one :class:`mama.serve.backend.ServeBackend` method per action:

- *Search*: a text query (or an uploaded clip) -> the nearest indexed videos, each as a strip of its
  keyframes with its score, the top one playing in the page (click a strip to play another).
- *Caption*: an indexed or uploaded video -> its keyframes, the 3 x 4 grid the LVLM sees, and the
  captions a LLaVA model writes from it, with the generation settings.
- *Runs*: a run folder -> its loss curve, the learned loss-to-weight map, the mean weight per caption
  kind over training and the final metrics.

Nothing leaves the machine: the server binds 127.0.0.1 unless told otherwise, gradio's analytics and
version check are off, the hub is offline, no share link is made, and the page uses system fonts instead
of fetching web fonts. gradio is imported only here, after the environment is set (it reads
``GRADIO_TEMP_DIR`` at import), and only when the app starts: ``mama --help`` never loads it.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mama.serve.backend import ERROR_PREFIX, MAX_CHOICES, MAX_TOP_K, ServeBackend

if TYPE_CHECKING:
    import gradio

__all__ = ["build_app", "prepare_environment", "serve"]

DEFAULT_MAX_UPLOAD_MB = 200
# Keyframe strips are about 6:1; gradio's gallery would fit each into a square cell.
CSS = """
#results .thumbnail-item { aspect-ratio: auto !important; height: auto !important; }
#results .thumbnail-item img { height: auto !important; }
#results .caption-label { position: static !important; }
"""


def prepare_environment(temp_dir: Path) -> None:
    """Settings gradio and the hub read at import time: no analytics or version check, no hub access,
    uploads and served files under ``temp_dir``. Call before gradio is imported."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["GRADIO_TEMP_DIR"] = str(temp_dir)
    if "gradio" in sys.modules and os.path.realpath(sys.modules["gradio"].utils.get_upload_folder()) != str(
        Path(temp_dir).resolve()
    ):
        print(f"mama serve: gradio was imported before the temp folder {temp_dir} was set", file=sys.stderr)


def _toast(gr: Any, handler: Callable[..., tuple[Any, ...]]) -> Callable[..., tuple[Any, ...]]:
    """``handler`` plus a gradio warning pop-up when its status (last output) reports an error."""

    @functools.wraps(handler)
    def wrapped(*args: Any) -> tuple[Any, ...]:
        out = handler(*args)
        if isinstance(out[-1], str) and out[-1].startswith(ERROR_PREFIX):
            gr.Warning(out[-1].removeprefix(ERROR_PREFIX))
        return out

    return wrapped


def _import_captioning_code() -> None:
    """Import the LLaVA classes (code, no weights) in the background: importing transformers' model code
    takes seconds that the first caption request would otherwise wait for."""
    import transformers

    for name in ("AutoProcessor", "LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration"):
        getattr(transformers, name)  # transformers imports a class's module on first access


def build_app(backend: ServeBackend) -> gradio.Blocks:
    """The page: Search, Caption and Runs tabs wired to ``backend`` (see the module docstring)."""
    import gradio as gr

    from mama.augment.captioner import DEFAULT_PROMPT

    num_videos = len(backend.ids)
    info = backend.index.info
    with gr.Blocks(title="mama serve", analytics_enabled=False) as app:
        gr.Markdown(
            f"## mama serve\nIndex `{backend.index_dir}`: {num_videos} videos, {info['dim']}-d embeddings "
            f"of {info['num_frames']} frames, model `{backend.encoder.source}`"
        )
        with gr.Tab("Search", elem_id="tab-search"):
            with gr.Row():
                query = gr.Textbox(
                    label="Text query", placeholder="describe the video you look for", scale=4, elem_id="query"
                )
                top_k = gr.Slider(1, min(MAX_TOP_K, num_videos), value=min(5, num_videos), step=1, label="top k")
            search_button = gr.Button("Search", variant="primary", elem_id="search-button")
            with gr.Accordion("... or find the videos nearest to an uploaded clip", open=False):
                query_clip = gr.Video(sources=["upload"], label="Query clip", elem_id="query-clip")
                clip_button = gr.Button("Find similar videos", elem_id="clip-button")
            search_status = gr.Markdown(elem_id="search-status")
            with gr.Row():
                gallery = gr.Gallery(
                    label="Results: keyframe strips (click one to play it)", columns=1, height=520,
                    object_fit="contain", allow_preview=False, elem_id="results", scale=3,
                )  # fmt: skip
                player = gr.Video(label="Clip", interactive=False, autoplay=True, loop=True, elem_id="player", scale=2)
            table = gr.Dataframe(
                headers=["rank", "id", "score", "video"], interactive=False, elem_id="results-table", wrap=True
            )
            hits = gr.State([])
            outputs = [gallery, player, table, hits, search_status]
            search = _toast(gr, backend.on_search_text)
            search_button.click(search, [query, top_k], outputs)
            query.submit(search, [query, top_k], outputs)
            clip_button.click(_toast(gr, backend.on_search_video), [query_clip, top_k], outputs)

            def play(videos: list[str], event: gr.SelectData) -> tuple[Any, ...]:
                return _toast(gr, backend.on_select_hit)(videos, event.index)

            # Set here, not as an annotation: gradio finds the event parameter by its evaluated type.
            play.__annotations__["event"] = gr.SelectData
            gallery.select(play, [hits], [player, search_status])

        with gr.Tab("Caption", elem_id="tab-caption"):
            choices = [(vid, str(path)) for vid, path in zip(backend.ids, backend.videos, strict=True)][:MAX_CHOICES]
            with gr.Row():
                video = gr.Dropdown(
                    choices, value=choices[0][1] if choices else None, allow_custom_value=True, elem_id="caption-video",
                    label="Indexed video (or type an id, or a path inside the index's video folders)",
                )  # fmt: skip
                caption_clip = gr.Video(sources=["upload"], label="... or upload a clip (used when given)")
            with gr.Row():
                model = gr.Dropdown(
                    [(name, i) for i, name in enumerate(backend.captioners)],
                    value=0 if backend.captioners else None, label="Captioning model (mama serve --captioner)",
                )  # fmt: skip
                prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt", scale=2)
            with gr.Row():
                num_captions = gr.Slider(1, 5, value=2, step=1, label="captions")
                temperature = gr.Slider(0.0, 1.5, value=0.2, step=0.05, label="temperature (0 = greedy)")
                max_new_tokens = gr.Slider(8, 256, value=64, step=8, label="max new tokens")
                seed = gr.Number(0, precision=0, label="seed", minimum=0)
            caption_button = gr.Button("Caption", variant="primary", elem_id="caption-button")
            caption_status = gr.Markdown(elem_id="caption-status")
            keyframes = gr.Gallery(
                label="Keyframes", columns=6, height="auto", object_fit="contain", elem_id="keyframes"
            )
            with gr.Row():
                grid = gr.Image(label="The 3 x 4 keyframe grid the LVLM sees", type="numpy", elem_id="grid", scale=3)
                with gr.Column(scale=2):
                    captions = gr.Markdown(label="Captions", elem_id="captions")
                    settings = gr.JSON(label="Generation settings", elem_id="settings")
            caption_button.click(
                _toast(gr, backend.on_caption),
                [video, caption_clip, model, prompt, num_captions, temperature, max_new_tokens, seed],
                [keyframes, grid, captions, settings, caption_status],
            )

        with gr.Tab("Runs", elem_id="tab-runs"):
            runs = backend.run_choices()
            with gr.Row():
                run = gr.Dropdown(
                    runs, value=None, label=f"Run folder under {backend.runs_dir}", elem_id="run", scale=4
                )
                refresh = gr.Button("Refresh list", scale=1)
            run_status = gr.Markdown(elem_id="run-status")
            with gr.Row():
                loss_plot = gr.Plot(label="Training loss", elem_id="loss-plot")
                curve_plot = gr.Plot(label="Learned loss-to-weight map", elem_id="curve-plot")
            with gr.Row():
                kinds_plot = gr.Plot(label="Mean weight per caption kind", elem_id="kinds-plot")
                metrics = gr.Dataframe(headers=["metric", "value"], interactive=False, elem_id="metrics")
            run.change(_toast(gr, backend.on_run), [run], [loss_plot, curve_plot, kinds_plot, metrics, run_status])
            refresh.click(lambda: gr.Dropdown(choices=backend.run_choices()), [], [run])
    return app


def serve(
    index: str | os.PathLike[str],
    model: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int | None = None,
    captioners: Sequence[str] = (),
    runs: str | os.PathLike[str] = "runs",
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    device: str = "cpu",
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the app until interrupted (Ctrl+C or SIGTERM), then delete its temp folder.

    Args:
        index: index folder (``mama embed``); model: the model that built it.
        host, port: where to listen (port None: gradio's first free port from 7860).
        captioners: LLaVA models the *Caption* tab offers (local folders or hub ids already cached).
        runs: folder whose run folders the *Runs* tab lists.
        max_upload_mb: uploads above this size (MiB) are refused.
        ready: called with the URL once the server answers (tests use it; the CLI prints the URL).
    """
    if max_upload_mb <= 0:
        raise ValueError(f"max_upload_mb must be positive, got {max_upload_mb}")
    temp_dir = Path(tempfile.mkdtemp(prefix="mama-serve-"))
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (a service manager, `kill`) unwinds like Ctrl+C, so the temp folder is still removed.
        signal.signal(signal.SIGTERM, lambda *_: signal.default_int_handler(signal.SIGINT, None))
    try:
        prepare_environment(temp_dir)
        backend = ServeBackend(
            index, model, temp_dir, runs, captioners, max_upload_bytes=int(max_upload_mb * 2**20), device=device
        )
        import gradio as gr

        app = build_app(backend)
        theme = gr.themes.Default(
            font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
        )
        _, url, _ = app.launch(
            server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=True, quiet=True,
            max_file_size=int(max_upload_mb * 2**20),
            ssr_mode=False, mcp_server=False, enable_monitoring=False, show_error=False, theme=theme,
            footer_links=[], css=CSS,
        )  # fmt: skip
        if captioners:
            threading.Thread(target=_import_captioning_code, name="import-transformers", daemon=True).start()
        print(f"mama serve: {url} (index {index}, {len(backend.ids)} videos; Ctrl+C stops)", flush=True)
        if ready is not None:
            ready(url)
        try:
            app.block_thread()
        finally:
            app.close()
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
