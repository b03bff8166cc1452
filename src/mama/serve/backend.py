"""What ``mama serve`` does for each request, without gradio: search, keyframes, captions, run views.

:class:`ServeBackend` holds the index, the model that built it (fingerprint checked) and the app's temp
folder. Each ``on_*`` method takes what the browser sent and returns what the page shows, status line
last; a request the app refuses (an empty query, a path outside the index's video folders, a corrupt or
too large upload, an unknown run) returns empty outputs and a status starting with
:data:`ERROR_PREFIX` naming the problem, so the server keeps serving. :mod:`mama.serve.app` wires the
methods to gradio components, so tests can call them directly without importing gradio.

Every file the backend writes (keyframe strips) goes under ``temp_dir``; gradio puts uploads and the
images and clips it serves there too (``GRADIO_TEMP_DIR``), and :func:`mama.serve.app.serve` removes the
folder on exit.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mama.serve.runs import find_runs, view_run

if TYPE_CHECKING:
    import numpy as np

    from mama.augment.captioner import LlavaCaptioner
    from mama.inference.embed import Encoder, SearchIndex

__all__ = ["ERROR_PREFIX", "ServeBackend", "UserError"]

ERROR_PREFIX = "**Error:** "
# Keyframe strip of a search hit: this many keyframes side by side, each this many pixels on its short side.
STRIP_FRAMES = 6
STRIP_SHORT_SIDE = 96
# The caption tab's input: the keyframe grid of mama.augment (12 keyframes in 3 x 4 tiles of 224 px).
CAPTION_KEYFRAMES = 12
CAPTION_ROWS, CAPTION_COLS = 3, 4
CAPTION_TILE = 224
# Search results per query the page offers at most.
MAX_TOP_K = 50
# Indexed videos listed in the caption tab's picker; the others can still be typed (id or path).
MAX_CHOICES = 2000
# Upload suffixes accepted (what PyAV decodes and browsers commonly produce).
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".ogv")

T = TypeVar("T")


class UserError(ValueError):
    """A request the page refuses; the message is shown to the user as is."""


def _minimal_roots(folders: Sequence[Path]) -> list[Path]:
    """The folders of ``folders`` that lie inside no other one (sorted), e.g. [a, a/b, c] -> [a, c]."""
    roots: list[Path] = []
    for folder in sorted(set(folders)):
        if not roots or not folder.is_relative_to(roots[-1]):
            roots.append(folder)
    return roots


class ServeBackend:
    """The index, its model and the app's temp folder; one method per page action.

    Args:
        index_dir: index folder written by ``mama embed``.
        model: the model that built it (exported folder, run or checkpoint); its fingerprint must match.
        temp_dir: the app's private temp folder (uploads arrive there; strips are written there).
        runs_dir: root of the run folders the *Runs* tab lists.
        captioners: LLaVA models (local folders or cached hub ids) the *Caption* tab may load; the
            browser picks one of these by position, never names a folder itself.
        max_upload_bytes: larger uploads are refused (gradio refuses them first; this is checked again).
        device: where the retrieval model runs.
    """

    def __init__(
        self,
        index_dir: str | os.PathLike[str],
        model: str | os.PathLike[str],
        temp_dir: str | os.PathLike[str],
        runs_dir: str | os.PathLike[str] = "runs",
        captioners: Sequence[str] = (),
        max_upload_bytes: int = 200 * 2**20,
        device: str = "cpu",
    ) -> None:
        from mama.inference.embed import Encoder, open_index

        self.index_dir = Path(index_dir)
        self.index: SearchIndex = open_index(self.index_dir)  # verified: sizes, sha256, rows, embeddings
        info = self.index.info
        self.encoder: Encoder = Encoder.from_pretrained(model, device=device, num_frames=int(info["num_frames"]))
        self.index.check_encoder(self.encoder)
        self.temp_dir = Path(temp_dir).resolve()
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.runs_dir = Path(runs_dir)
        self.captioners = list(captioners)
        self.max_upload_bytes = max_upload_bytes
        # Paths in the index are as `mama embed` was given them; relative ones are taken from the cwd.
        self.videos = [Path(row["video"]).resolve() for row in self.index.rows]
        self.ids = [str(row["id"]) for row in self.index.rows]
        self._by_id = {vid: path for vid, path in zip(self.ids, self.videos, strict=True)}
        self.roots = _minimal_roots([path.parent for path in self.videos])
        self._captioner: LlavaCaptioner | None = None
        self._captioner_lock = threading.Lock()
        self._strip_lock = threading.Lock()

    # ---- checks on what the browser sends ---------------------------------------------------------

    def resolve_video(self, text: str | None) -> Path:
        """An indexed video's id, or a path inside the index's video folders -> its resolved path.

        Raises:
            UserError: empty, outside every folder the index's videos are in (after resolving symlinks
                and ``..``), or not there.
        """
        text = (text or "").strip()
        if not text:
            raise UserError("pick an indexed video or upload one")
        if text in self._by_id:
            return self._by_id[text]
        path = Path(text).resolve()
        if not any(path.is_relative_to(root) for root in self.roots):
            raise UserError(
                f"{text}: not inside the folders of the index's videos ({', '.join(map(str, self.roots[:3]))}"
                f"{', ...' if len(self.roots) > 3 else ''}); only those videos can be opened"
            )
        if not path.exists():
            raise UserError(f"{text}: no such video")
        return path

    def check_upload(self, upload: str | None) -> Path:
        """An uploaded file (a path gradio gives, inside the temp folder) that is small enough.

        Raises:
            UserError: no upload, a path outside the temp folder, a missing file, a file over the limit.
        """
        if not upload:
            raise UserError("upload a video first")
        path = Path(upload).resolve()
        if not path.is_relative_to(self.temp_dir):
            raise UserError(f"{Path(upload).name}: not an upload of this app")
        if not path.is_file():
            raise UserError(f"{path.name}: the upload is gone (uploads last until the server stops); upload it again")
        size = path.stat().st_size
        if size > self.max_upload_bytes:
            raise UserError(
                f"{path.name}: {size / 2**20:.3g} MB, over the upload limit of {self.max_upload_bytes / 2**20:.3g} MB "
                "(mama serve --max-upload-mb)"
            )
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            raise UserError(f"{path.name}: not a video file ({', '.join(VIDEO_SUFFIXES)})")
        return path

    @staticmethod
    def _top_k(top_k: float | int | None) -> int:
        try:
            k = int(top_k or 0)
        except (TypeError, ValueError):
            raise UserError(f"top k must be a whole number, got {top_k!r}") from None
        if not 1 <= k <= MAX_TOP_K:
            raise UserError(f"top k must be between 1 and {MAX_TOP_K}, got {k}")
        return k

    # ---- pictures ---------------------------------------------------------------------------------

    def keyframe_strip(self, video: Path) -> Path | None:
        """A JPEG of ``STRIP_FRAMES`` keyframes of ``video`` side by side (cached in the temp folder).

        Raises:
            VideoDecodeError: the video cannot be decoded.
        """
        from mama.augment.keyframes import extract_keyframes, save_image, tile_grid
        from mama.data.video import decode_frames

        stat = video.stat()
        key = hashlib.sha256(f"{video}\0{stat.st_mtime_ns}\0{stat.st_size}".encode()).hexdigest()[:24]
        out = self.temp_dir / "strips" / f"{key}.jpg"
        with self._strip_lock:
            if not out.is_file():
                keyframes = extract_keyframes(video, num=STRIP_FRAMES)
                frames = decode_frames(video, indices=keyframes.keyframes, short_side=STRIP_SHORT_SIDE)
                out.parent.mkdir(exist_ok=True)
                save_image(out, tile_grid(frames, 1, len(keyframes.keyframes)))  # (h, n * w, 3)
        return out

    def _hits_page(self, hits: list[dict[str, Any]], status: str) -> tuple[Any, ...]:
        from mama.data.video import VideoDecodeError

        gallery, table, videos = [], [], []
        for hit in hits:
            video = Path(hit["video"]).resolve()
            try:
                strip: Path | None = self.keyframe_strip(video)
            except (VideoDecodeError, OSError) as exc:  # an indexed video deleted or damaged since indexing
                strip = None
                status += f"\n\n{hit['id']}: no keyframes ({exc})"
            if strip is not None:
                gallery.append((str(strip), f"#{hit['rank']}  {hit['id']}  score {hit['score']:.3f}"))
            table.append([hit["rank"], hit["id"], round(float(hit["score"]), 4), str(video)])
            videos.append(str(video))
        return gallery, self._playable(videos[0]) if videos else None, table, videos, status

    def _playable(self, video: str) -> str | None:
        """The clip for the page's video player, as a link (or, across file systems, a copy) inside the
        temp folder; None for a frame folder (nothing to play).

        Only the temp folder is ever handed to gradio's file route: allowing the videos' folders instead
        would serve every file under them (any file, dotfiles, whole subtrees) to whoever reaches the
        port, not only the indexed clips.
        """
        path = Path(video)
        if not path.is_file():
            return None
        stat = path.stat()
        key = hashlib.sha256(f"{path}\0{stat.st_mtime_ns}\0{stat.st_size}".encode()).hexdigest()[:24]
        out = self.temp_dir / "clips" / f"{key}{path.suffix.lower()}"
        with self._strip_lock:
            if not out.is_file():
                out.parent.mkdir(exist_ok=True)
                part = out.with_name(f".{out.name}.part")
                part.unlink(missing_ok=True)
                try:
                    os.link(path, part)
                except OSError:  # another file system (or no hard links): copy
                    shutil.copyfile(path, part)
                part.replace(out)
        return str(out)

    # ---- page actions -----------------------------------------------------------------------------

    def on_search_text(self, query: str | None, top_k: float | int | None) -> tuple[Any, ...]:
        """Text query -> (gallery of (strip, label), clip of the top hit, table rows, hit paths, status)."""
        return self._guard(lambda: self._search_text(query, top_k), 4)

    def _search_text(self, query: str | None, top_k: float | int | None) -> tuple[Any, ...]:
        query = (query or "").strip()
        if not query:
            raise UserError("the query is empty: type a few words describing the video you look for")
        k = self._top_k(top_k)
        hits = self.index.search_texts([query], self.encoder, k)[0]
        return self._hits_page(hits, f"Top {len(hits)} of {len(self.ids)} videos for *{query}*")

    def on_search_video(self, upload: str | None, top_k: float | int | None) -> tuple[Any, ...]:
        """Uploaded clip -> its nearest indexed videos, in the same outputs as :meth:`on_search_text`."""
        return self._guard(lambda: self._search_video(upload, top_k), 4)

    def _search_video(self, upload: str | None, top_k: float | int | None) -> tuple[Any, ...]:
        path = self.check_upload(upload)
        k = self._top_k(top_k)
        emb, failed = self.encoder.encode_videos([path])  # (1, D)
        if failed:
            raise UserError(f"{path.name}: cannot be decoded as a video ({failed[0].split(': ', 1)[-1]})")
        hits = self.index.search_vectors(emb, k)[0]
        return self._hits_page(hits, f"Top {len(hits)} of {len(self.ids)} videos nearest to the uploaded clip")

    def on_select_hit(self, videos: list[str] | None, index: int | None) -> tuple[Any, ...]:
        """A clicked result (position ``index`` among the last results) -> (its clip, status)."""

        def select() -> tuple[Any, ...]:
            if not videos or index is None or not 0 <= int(index) < len(videos):
                raise UserError("no such result: search again")
            video = self.resolve_video(videos[int(index)])  # state lives on the server, checked anyway
            return self._playable(str(video)), f"Playing {video.name}"

        return self._guard(select, 1)

    def on_caption(
        self,
        video: str | None,
        upload: str | None,
        model_choice: int | str | None,
        prompt: str | None,
        num_captions: float | int,
        temperature: float,
        max_new_tokens: float | int,
        seed: float | int,
    ) -> tuple[Any, ...]:
        """Caption an indexed video (id or path) or an upload (which wins when both are given) with a
        LLaVA model -> (keyframes as (image, label), grid image, captions markdown, settings, status)."""
        return self._guard(
            lambda: self._caption(video, upload, model_choice, prompt, num_captions, temperature, max_new_tokens, seed),
            4,
        )

    def _caption(
        self,
        video: str | None,
        upload: str | None,
        model_choice: int | str | None,
        prompt: str | None,
        num_captions: float | int,
        temperature: float,
        max_new_tokens: float | int,
        seed: float | int,
    ) -> tuple[Any, ...]:
        from dataclasses import asdict

        from mama.augment.captioner import DEFAULT_PROMPT, CaptionConfig, LlavaCaptioner
        from mama.augment.job import KeyframeConfig, PrepareCaptionInput
        from mama.augment.keyframes import tile_grid
        from mama.data.records import Caption, VideoRecord

        path = self.check_upload(upload) if upload else self.resolve_video(video)
        model = self._captioner_model(model_choice)
        try:
            cfg = CaptionConfig(
                model=model, prompt=(prompt or "").strip() or DEFAULT_PROMPT, num_captions=int(num_captions),
                temperature=float(temperature), max_new_tokens=int(max_new_tokens), seed=int(seed), batch_size=1,
            )  # fmt: skip
        except (TypeError, ValueError) as exc:
            raise UserError(f"generation settings: {exc}") from None
        keyframe_cfg = KeyframeConfig(
            CAPTION_KEYFRAMES, rows=CAPTION_ROWS, cols=CAPTION_COLS, tile_short_side=CAPTION_TILE
        )
        # multi_frame=True returns the keyframes themselves; the page shows them and the grid made of them.
        item = PrepareCaptionInput(keyframe_cfg, multi_frame=True)(
            VideoRecord(path.stem, path, [Caption("-", "human")])
        )
        if "error" in item:
            raise UserError(f"{path.name}: cannot be decoded as a video ({item['error'].split(': ', 1)[-1]})")
        frames = item["image"]  # (12, h, w, 3) uint8
        grid = tile_grid(frames, CAPTION_ROWS, CAPTION_COLS)  # (3 h, 4 w, 3)
        with self._captioner_lock:
            if self._captioner is None or self._captioner.cfg.model != model:
                self._captioner = None  # free the old model before loading the next
                try:
                    self._captioner = LlavaCaptioner(cfg)
                except (OSError, ValueError) as exc:
                    raise UserError(str(exc)) from None
            captioner = self._captioner
            # Same model, device and dtype: only the generation settings change, which generate reads per call.
            captioner.cfg = cfg
            captions = captioner.caption([grid])[0]
        keyframes: list[tuple[np.ndarray, str]] = [
            (frame.numpy(), f"frame {index}") for frame, index in zip(frames, item["keyframes"], strict=True)
        ]
        text = "\n".join(f"{i}. {c}" for i, c in enumerate(captions, 1)) or (
            "*(every generation was dropped by the length / repetition filters)*"
        )
        settings = {
            **cfg.generation(),
            "device": str(captioner.device),
            "dtype": str(captioner.dtype).removeprefix("torch."),
            "keyframes": asdict(keyframe_cfg),
            "video": str(path.name),
            "num_frames": item["num_frames"],
        }
        return keyframes, grid.numpy(), text, settings, f"{len(captions)} caption(s) of {path.name} by {model}"

    def _captioner_model(self, choice: int | str | None) -> str:
        """The captioner the browser picked: an entry of ``captioners`` (by value or position), nothing else."""
        if not self.captioners:
            raise UserError("no captioning model was given: start mama serve with --captioner MODEL")
        if isinstance(choice, str) and choice in self.captioners:
            return choice
        if isinstance(choice, int) and 0 <= choice < len(self.captioners):
            return self.captioners[choice]
        raise UserError(f"{choice!r} is not one of the captioning models this server offers")

    def run_choices(self) -> list[str]:
        """The run folders the *Runs* tab lists (relative to ``runs_dir``)."""
        return find_runs(self.runs_dir)

    def on_run(self, name: str | None) -> tuple[Any, ...]:
        """A run folder's name -> (loss figure, weight curve, weights per kind, metric rows, status)."""

        def show() -> tuple[Any, ...]:
            if not name:
                raise UserError(f"pick a run (folders with a log.jsonl under {self.runs_dir})")
            try:
                view = view_run(self.runs_dir, name)
            except ValueError as exc:
                raise UserError(str(exc)) from None
            status = f"Run {view.name}" + "".join(f"\n\n- {note}" for note in view.notes)
            return view.loss, view.weight_curve, view.weights_by_kind, view.metrics, status

        return self._guard(show, 4)

    @staticmethod
    def _guard(action: Callable[[], tuple[Any, ...]], outputs: int) -> tuple[Any, ...]:
        """Run ``action``; on any failure return ``outputs`` empty outputs and an error status instead,
        so that one bad request never takes the server down."""
        try:
            return action()
        except UserError as exc:
            return (*([None] * outputs), ERROR_PREFIX + str(exc))
        except Exception as exc:  # a bug or an unexpected file: shown, logged, and the server goes on
            traceback.print_exc()
            return (*([None] * outputs), f"{ERROR_PREFIX}{type(exc).__name__}: {exc}")
