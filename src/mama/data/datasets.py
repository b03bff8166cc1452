"""Readers for the standard text-video retrieval benchmarks, into the common :class:`VideoRecord`.

One small parser per annotation layout (style guide, habit 6); they share the record building
(:class:`_RecordBuilder`) and the video lookup (:class:`VideoIndex`), so no reader repeats another.
``docs/datasets.md`` shows every layout as a folder tree.

=================  =========================================================  ====================
format             one split's annotation file                                records
=================  =========================================================  ====================
``msrvtt``         CLIP4Clip ``MSRVTT_train.{9k,7k}.csv`` (+ ``MSRVTT_data``  one per video, all
                   ``.json`` next to it) or ``MSRVTT_JSFUSION_test.csv``      its captions / one
                                                                              per 1k-A row
``msrvtt_clipvip`` CLIP-ViP / ClipBERT JSON or JSON lines (``clip_name`` or   one per clip, captions
                   ``clip_id``; ``caption`` or ``text``)                      merged
``didemo``         CLIP4Clip ``{train,val,test}_data.json``                   one paragraph per video
``activitynet``    ActivityNet Captions ``train.json`` / ``val_1.json`` /     one paragraph per video
                   ``val_2.json``
``msvd``           CLIP4Clip ``{train,val,test}_list.txt`` (+ ``raw-captions  one per video, all its
                   .pkl`` next to it)                                         captions
``lsmdc``          CLIP4Clip ``LSMDC16_*.csv`` (tab-separated)                one per clip
``jsonl``          ours (:func:`mama.data.records.read_jsonl`)                one per line
=================  =========================================================  ====================

Every benchmark caption is ``Caption(text, source="human")``. Videos are looked up by id in a
:class:`VideoIndex` of the ``videos`` folder; a video that is absent gets its expected path, so the
loader can report and skip it instead of this module failing on a partly downloaded dataset. A bad
annotation file (not UTF-8, malformed JSON, CSV or pickle, a value of the wrong type, a missing field)
raises :class:`mama.data.records.AnnotationError` naming the file and the line or entry.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from mama.data.records import AnnotationError, Caption, VideoRecord, parse_json, read_jsonl, read_text, text_lines

__all__ = [
    "DATASET_FORMATS",
    "IMAGE_EXTENSIONS",
    "PROTOCOL_TEST_VIDEOS",
    "VIDEO_EXTENSIONS",
    "Reader",
    "VideoIndex",
    "read_activitynet",
    "read_dataset",
    "read_didemo",
    "read_jsonl_dataset",
    "read_lsmdc",
    "read_msrvtt",
    "read_msrvtt_clipvip",
    "read_msvd",
    "split_shortfall",
]

# Lower case; matching ignores case. DiDeMo's Flickr videos come as uploaded by phones and camcorders:
# .MOV, .AVI, .MTS, .M2TS, .3G2, .MOD ... (its public val and test files name 20 distinct extensions).
VIDEO_EXTENSIONS: tuple[str, ...] = (
    ".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".3gp", ".wmv", ".flv",
    ".mts", ".m2ts", ".ts", ".3g2", ".ogv", ".vob", ".mxf", ".asf", ".f4v", ".m2v", ".mpe", ".divx",
    ".qt", ".dv", ".rm", ".rmvb", ".mod", ".tod",
)  # fmt: skip
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")

# A reader takes one split's annotation file and the videos folder (None: the format's default).
Reader = Callable[[Path, Path | None], list[VideoRecord]]


def _video_suffix(name: str) -> str:
    """The known video extension ``name`` ends with (as written), or ''. A trailing dot is part of the
    name, not an extension (``"<flickr id>."`` has none)."""
    suffix = PurePosixPath(name).suffix
    return suffix if suffix.lower() in VIDEO_EXTENSIONS else ""


def _name_key(name: str) -> str:
    """A file name with its video extension in lower case: the key that matches ids case-insensitively
    in the extension only (``x.MOV`` and ``x.mov``, never ``X.mov``)."""
    suffix = _video_suffix(name)
    return name[: len(name) - len(suffix)] + suffix.lower() if suffix else name


def _preference(path: Path) -> tuple[int, int, str]:
    """Sort key among paths that claim the same id: fewest components, then shortest, then alphabetical."""
    return len(path.parts), len(str(path)), str(path)


class VideoIndex:
    """Video id -> path for every video under ``root``, found by one recursive walk.

    A video is either a file with an extension in :data:`VIDEO_EXTENSIONS` (id: the name without that
    extension) or a *frame folder*, a directory whose (non-hidden) files are all images in
    :data:`IMAGE_EXTENSIONS` (id: the folder name). Subfolders are searched too (LSMDC keeps one folder
    per movie), symlinked folders included; hidden files and folders are ignored. Every other file is
    indexed by its exact name, so an id that names a file as it is (``<flickr id>.`` or an extension
    outside the list) finds it too; see :meth:`find`.

    When an id occurs twice, video files win over frame folders, then the path with the fewest
    components (then the shortest, then the alphabetically first); one warning lists the clashes.

    Raises:
        FileNotFoundError: ``root`` is not a folder (a wrong ``data.videos`` would otherwise silently
            turn every video into a missing one).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        # abspath, not resolve: keep symlinked dataset folders pointing where the user put them.
        self.root = Path(os.path.abspath(root))
        if not self.root.is_dir():
            raise FileNotFoundError(f"video folder {self.root} does not exist or is not a folder")
        found: dict[str, list[tuple[int, Path]]] = {}
        files: dict[str, list[Path]] = {}
        for path, is_frames in self._walk():
            if is_frames:
                found.setdefault(path.name, []).append((1, path))
                continue
            files.setdefault(_name_key(path.name), []).append(path)
            suffix = _video_suffix(path.name)
            if suffix:
                found.setdefault(path.name[: -len(suffix)], []).append((0, path))
        # Exact file names (video extension case-folded): an id that names a file is used as it is.
        self._files = {name: min(paths, key=_preference) for name, paths in files.items()}
        self._paths: dict[str, Path] = {}
        clashes: list[str] = []
        for video_id, candidates in found.items():
            best = min(candidates, key=lambda c: (c[0], *_preference(c[1])))
            self._paths[video_id] = best[1]
            if len(candidates) > 1:
                clashes.append(f"{video_id!r} ({len(candidates)}x, using {best[1]})")
        if clashes:
            shown = "; ".join(sorted(clashes)[:5]) + ("; ..." if len(clashes) > 5 else "")
            warnings.warn(
                f"{self.root}: {len(clashes)} video ids occur more than once, preferring video files over "
                f"frame folders, then the shortest path: {shown}",
                stacklevel=2,
            )

    def _walk(self) -> Iterator[tuple[Path, bool]]:
        """Yield (path, is_frame_folder) for every frame folder and every file that is not an image
        under root, in a deterministic order."""
        visited: set[tuple[int, int]] = set()
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            stat = os.stat(dirpath)
            # Following symlinks can revisit a folder (or loop forever on a link to a parent).
            if (stat.st_dev, stat.st_ino) in visited:
                dirnames[:] = []
                continue
            visited.add((stat.st_dev, stat.st_ino))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files = sorted(f for f in filenames if not f.startswith("."))
            folder = Path(dirpath)
            if folder != self.root and files and all(Path(f).suffix.lower() in IMAGE_EXTENSIONS for f in files):
                yield folder, True
                continue
            for name in files:
                if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                    yield folder / name, False

    def __len__(self) -> int:
        return len(self._paths)

    def items(self) -> list[tuple[str, Path]]:
        """Every (video id, path) found, sorted by id."""
        return sorted(self._paths.items())

    def __contains__(self, video_id: object) -> bool:
        return isinstance(video_id, str) and self.find(video_id) is not None

    def find(self, video_id: str) -> Path | None:
        """The path of ``video_id``, or None when it is not under root.

        The id may carry a folder prefix (only its last component is used). In order:

        1. a file named exactly the id (DiDeMo's ``"<flickr id>.mov"``, ``"<flickr id>.mts"`` or
           ``"<flickr id>."``), its video extension matched in any case (``.MOV`` for ``.mov``);
        2. the id plus any video extension, or a frame folder named the id (``video0`` ->
           ``video0.mp4``; a transcoded ``<name>.mov.mp4``; ``<name>.`` -> ``<name>..mp4``);
        3. the id less its video extension plus any other (``<name>.mov`` -> ``<name>.mp4``).

        A trailing dot is part of the id and never dropped.
        """
        name = PurePosixPath(video_id).name
        path = self._files.get(_name_key(name)) or self._paths.get(name)
        suffix = _video_suffix(name)
        if path is None and suffix:
            path = self._paths.get(name[: -len(suffix)])
        return path

    def resolve(self, video_id: str) -> Path:
        """The path of ``video_id``; when absent, the path it is expected at.

        The expected path is ``root / f"{video_id}.mp4"`` (``root / video_id`` when the id already ends
        with a video extension). It does not exist; the loader reports and skips such records.
        """
        path = self.find(video_id)
        if path is not None:
            return path
        return self.root / (video_id if _video_suffix(video_id) else f"{video_id}.mp4")

    def resolve_first(self, video_ids: Sequence[str]) -> Path:
        """The path of the first of ``video_ids`` that is present, else the expected path of the first."""
        for video_id in video_ids:
            path = self.find(video_id)
            if path is not None:
                return path
        return self.resolve(video_ids[0])


# ---------------------------------------------------------------------------------------------------
# Shared parts: error locations, typed field access, record building. The file readers and field access
# are public because the QA readers (mama.data.qa_datasets, mama.data.qa_records) parse their annotations with them.


@contextmanager
def located_errors(path: Path, where: str) -> Iterator[None]:
    """Turn any ValueError raised inside into an :class:`AnnotationError` naming the file and the line
    or entry it concerns (one that already is an AnnotationError names its own file and passes as is)."""
    try:
        yield
    except AnnotationError:
        raise
    except ValueError as err:
        raise AnnotationError(f"{path}: {where}: {err}") from err


def typed_field(obj: Any, keys: str | Sequence[str], kind: type | tuple[type, ...]) -> Any:
    """``obj[key]`` for the first of ``keys`` present, checked to be of ``kind``."""
    names = (keys,) if isinstance(keys, str) else tuple(keys)
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected an object with {' or '.join(map(repr, names))}, got {type(obj).__name__}")
    for key in names:
        if key in obj:
            value = obj[key]
            if not isinstance(value, kind):
                expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
                raise ValueError(f"{key!r} must be {expected}, got {type(value).__name__}")
            return value
    raise ValueError(f"missing {' or '.join(map(repr, names))}")


def _auxiliary_file(annotations: Path, name: str, format: str) -> Path:
    """A file the format needs next to the split's annotation file (e.g. MSRVTT_data.json)."""
    path = annotations.parent / name
    if not path.is_file():
        raise FileNotFoundError(f"format {format!r} needs {name} next to {annotations.name}: {path} not found")
    return path


def load_json(path: Path) -> Any:
    """The JSON document in ``path``; bytes that are not UTF-8 or invalid JSON raise
    :class:`AnnotationError` naming the file (and the line)."""
    return _parse_document(path, read_text(path))


def _parse_document(path: Path, text: str) -> Any:
    try:
        return parse_json(text)
    except ValueError as err:  # its message gives the line and column
        raise AnnotationError(f"{path}: {err}") from None


def read_json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, object) for a JSON list or a JSON-lines file, whichever ``path`` holds."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        rows = _parse_document(path, text)
        yield from ((f"entry {i}", row) for i, row in enumerate(rows))
        return
    for line_no, line in enumerate(text_lines(text), start=1):
        if line.strip():
            with located_errors(path, f"line {line_no}"):
                row = parse_json(line)
            yield f"line {line_no}", row


def read_csv_rows(
    path: Path, delimiter: str = ",", quoted: bool = True
) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and (line number, row) pairs of a comma-separated (or ``delimiter``-separated) file with a
    header line, its cells ``quoted`` or not; a bad line raises :class:`AnnotationError` naming the file
    and the line."""
    # newline="": the csv module finds line ends itself, inside quoted cells too.
    text = io.StringIO(read_text(path), newline="")
    reader = csv.DictReader(text, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE)
    rows = []
    try:
        header = list(reader.fieldnames or [])
        for row in reader:
            # DictReader puts surplus cells under None and fills missing ones with None.
            if None in row or any(value is None for value in row.values()):
                raise AnnotationError(f"{path}: line {reader.line_num}: expected {len(header)} columns {header}")
            rows.append((reader.line_num, row))
    except csv.Error as err:
        raise AnnotationError(f"{path}: line {reader.line_num}: {err}") from err
    return header, rows


@dataclass
class _Pending:
    """A video's captions while its annotation is read; ``where`` is where it first appeared."""

    where: str
    texts: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


class _RecordBuilder:
    """Collect captions per video id in annotation order, then build the records.

    Args:
        merge: a repeated id adds its captions to the video's pool (formats that list one caption
            per row); otherwise a repeated id is an error.
        paragraph: the pool becomes one caption, the sentences joined with " " (paragraph-to-video
            retrieval); ``meta["num_sentences"]`` keeps how many were joined.
    """

    def __init__(self, *, merge: bool = False, paragraph: bool = False) -> None:
        self.merge = merge
        self.paragraph = paragraph
        self._videos: dict[str, _Pending] = {}
        self.blank = 0

    def add(self, video_id: Any, texts: Sequence[Any], where: str, meta: Mapping[str, Any] | None = None) -> None:
        """Add captions of ``video_id`` (raises ValueError, to be located by the caller)."""
        if not isinstance(video_id, str) or not video_id.strip():
            raise ValueError(f"video id must be a non-empty string, got {video_id!r}")
        cleaned = []
        for text in texts:
            if not isinstance(text, str):
                raise ValueError(f"caption must be a string, got {type(text).__name__}: {text!r}")
            # A blank caption carries nothing to retrieve; count it and warn once per file.
            if text.strip():
                cleaned.append(text.strip())
            else:
                self.blank += 1
        pending = self._videos.get(video_id)
        if pending is None:
            self._videos[video_id] = _Pending(where, cleaned, dict(meta or {}))
        elif self.merge:
            pending.texts.extend(cleaned)
        else:
            raise ValueError(f"duplicate video id {video_id!r} (first at {pending.where})")

    def build(
        self, path: Path, index: VideoIndex, aliases: Callable[[str], Sequence[str]] = lambda video_id: (video_id,)
    ) -> list[VideoRecord]:
        """The records in first-appearance order; ``aliases(id)`` lists the names to look videos up by."""
        if self.blank:
            warnings.warn(f"{path}: ignored {self.blank} blank captions", stacklevel=3)
        records = []
        for video_id, pending in self._videos.items():
            if not pending.texts:
                raise AnnotationError(f"{path}: {pending.where}: video {video_id!r} has no non-blank caption")
            meta = dict(pending.meta)
            texts = pending.texts
            if self.paragraph:
                meta["num_sentences"] = len(texts)
                texts = [" ".join(texts)]
            records.append(
                VideoRecord(
                    id=video_id,
                    video=index.resolve_first(aliases(video_id)),
                    captions=[Caption(text, "human") for text in texts],
                    meta=meta,
                )
            )
        return records


def video_index_for(annotations: Path, videos: Path | None) -> VideoIndex:
    """The :class:`VideoIndex` to look the videos of ``annotations`` up in: ``videos``, else its folder."""
    # Without a videos folder, look next to the annotations (the CLIP4Clip data folders mix both).
    return VideoIndex(videos if videos is not None else annotations.parent)


# ---------------------------------------------------------------------------------------------------
# One reader per annotation layout.


def read_msrvtt(annotations: Path, videos: Path | None) -> list[VideoRecord]:
    """MSR-VTT in CLIP4Clip's layout; the CSV's columns decide which split it is.

    - ``video_id`` only (``MSRVTT_train.9k.csv`` / ``MSRVTT_train.7k.csv``): one record per video with
      all its captions from ``MSRVTT_data.json`` (``{"sentences": [{"video_id", "caption"}, ...]}``),
      which must sit next to the CSV.
    - ``video_id`` and ``sentence`` (``MSRVTT_JSFUSION_test.csv``, the 1k-A test): one record per row
      with that single caption, the single-positive protocol; ``key`` and ``vid_key`` go to meta.
    """
    header, rows = read_csv_rows(annotations)
    builder = _RecordBuilder()
    if "video_id" in header and "sentence" in header:
        for line_no, row in rows:
            where = f"line {line_no}"
            with located_errors(annotations, where):
                meta: dict[str, str] = {key: row[key] for key in ("key", "vid_key") if key in row}
                builder.add(row["video_id"], [row["sentence"]], where, meta)
    elif "video_id" in header:
        data_path = _auxiliary_file(annotations, "MSRVTT_data.json", "msrvtt")
        data = load_json(data_path)
        sentences: dict[str, list[str]] = {}
        with located_errors(data_path, '"sentences"'):
            entries = typed_field(data, "sentences", list)
        for i, entry in enumerate(entries):
            with located_errors(data_path, f"sentences[{i}]"):
                sentences.setdefault(typed_field(entry, "video_id", str), []).append(typed_field(entry, "caption", str))
        for line_no, row in rows:
            where = f"line {line_no}"
            with located_errors(annotations, where):
                if row["video_id"] not in sentences:
                    raise ValueError(f"video {row['video_id']!r} has no caption in {data_path}")
                builder.add(row["video_id"], sentences[row["video_id"]], where)
    else:
        raise AnnotationError(
            f"{annotations}: expected a 'video_id' column (train list) or 'video_id' and 'sentence' columns "
            f"(1k-A test), found {header}"
        )
    return builder.build(annotations, video_index_for(annotations, videos))


def read_msrvtt_clipvip(annotations: Path, videos: Path | None) -> list[VideoRecord]:
    """MSR-VTT (or any set) in the CLIP-ViP / ClipBERT layout: a JSON list or JSON lines.

    Each row names a clip (``clip_name`` or ``clip_id``) and one caption or a list of them
    (``caption`` or ``text``); rows of the same clip are merged into its pool.
    """
    builder = _RecordBuilder(merge=True)
    for where, row in read_json_rows(annotations):
        with located_errors(annotations, where):
            text = typed_field(row, ("caption", "text"), (str, list))
            clip = typed_field(row, ("clip_name", "clip_id"), str)
            builder.add(clip, [text] if isinstance(text, str) else text, where)
    return builder.build(annotations, video_index_for(annotations, videos))


def read_didemo(annotations: Path, videos: Path | None) -> list[VideoRecord]:
    """DiDeMo in CLIP4Clip's layout (``{train,val,test}_data.json``), for paragraph-to-video retrieval.

    The file is a list of moments ``{"video", "description", "times", ...}``; a video's single caption
    is all its descriptions joined with " " in annotation order. The id is the ``video`` field as
    written, extension included (e.g. ``"<flickr id>.mov"``).
    """
    data = load_json(annotations)
    if not isinstance(data, list):
        raise AnnotationError(f"{annotations}: expected a JSON list of moments, got {type(data).__name__}")
    builder = _RecordBuilder(merge=True, paragraph=True)
    for i, moment in enumerate(data):
        where = f"entry {i}"
        with located_errors(annotations, where):
            builder.add(typed_field(moment, "video", str), [typed_field(moment, "description", str)], where)
    return builder.build(annotations, video_index_for(annotations, videos))


def _timestamp_start(timestamp: Any) -> float:
    if (
        not isinstance(timestamp, (list, tuple))
        or len(timestamp) != 2
        or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in timestamp)
    ):
        raise ValueError(f"timestamp must be [start, end] in seconds, got {timestamp!r}")
    return float(timestamp[0])


def _activitynet_aliases(video_id: str) -> tuple[str, str]:
    # The captions key videos as "v_<YouTube id>"; downloads are named with or without the prefix.
    return (video_id, video_id[2:]) if video_id.startswith("v_") else (video_id, f"v_{video_id}")


def read_activitynet(annotations: Path, videos: Path | None) -> list[VideoRecord]:
    """ActivityNet Captions (``train.json``, ``val_1.json``, ``val_2.json``), paragraph-to-video.

    The file maps video id -> ``{"duration", "timestamps", "sentences"}``; a video's single caption is
    its sentences, stripped and joined with " " in timestamp order. Videos are found as ``v_<id>`` or
    ``<id>``, whichever exists. ``duration`` (seconds) goes to meta.
    """
    data = load_json(annotations)
    if not isinstance(data, dict):
        raise AnnotationError(f"{annotations}: expected a JSON object of videos, got {type(data).__name__}")
    builder = _RecordBuilder(paragraph=True)
    for video_id, item in data.items():
        where = f"video {video_id!r}"
        with located_errors(annotations, where):
            sentences = typed_field(item, "sentences", list)
            timestamps = typed_field(item, "timestamps", list)
            if len(sentences) != len(timestamps):
                raise ValueError(f"{len(sentences)} sentences but {len(timestamps)} timestamps")
            # sorted() is stable: sentences starting together keep their annotation order.
            order = sorted(range(len(sentences)), key=lambda i: _timestamp_start(timestamps[i]))
            meta = {"duration": item["duration"]} if "duration" in item else {}
            builder.add(video_id, [sentences[i] for i in order], where, meta)
    return builder.build(annotations, video_index_for(annotations, videos), aliases=_activitynet_aliases)


class DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and strings only (safe on downloaded annotation pickles).

    Every way a pickle can run code (REDUCE, BUILD, NEWOBJ, INST, OBJ, extension codes) first looks a
    callable up through ``find_class``; refusing all lookups leaves dicts, lists, tuples, sets, strings
    and numbers, which is all ``raw-captions.pkl`` holds.
    """

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only dicts, lists and strings are allowed")


def load_data_pickle(path: Path, what: str) -> Any:
    """Unpickle plain containers and strings only (:class:`DataOnlyUnpickler`); anything else in
    ``path`` raises :class:`AnnotationError` saying it is not ``what``."""
    data = path.read_bytes()
    try:
        # utf-8: Python 2 pickles store str as bytes; the default ASCII would fail on accented words.
        return DataOnlyUnpickler(io.BytesIO(data), encoding="utf-8").load()
    except Exception as err:  # damaged bytes fail in open-ended ways (IndexError, TypeError, ...)
        raise AnnotationError(f"{path}: not {what}: {err or type(err).__name__}") from err


def _load_caption_pickle(path: Path) -> Any:
    return load_data_pickle(path, "a captions pickle")


def _join_tokens(caption: Any) -> Any:
    """CLIP4Clip's MSVD captions are token lists; join them back into a sentence."""
    if isinstance(caption, list) and all(isinstance(token, str) for token in caption):
        return " ".join(caption)
    return caption  # a string is kept; anything else is rejected by the builder


def read_msvd(annotations: Path, videos: Path | None) -> list[VideoRecord]:
    """MSVD in CLIP4Clip's layout: ``{train,val,test}_list.txt`` of video ids, one per line.

    Captions come from ``raw-captions.pkl`` next to the list (a dict video id -> list of token lists),
    unpickled without running any code. One record per video with all its captions: evaluation
    queries with every caption.
    """
    captions_path = _auxiliary_file(annotations, "raw-captions.pkl", "msvd")
    captions = _load_caption_pickle(captions_path)
    if not isinstance(captions, dict):
        raise AnnotationError(f"{captions_path}: expected a dict video id -> captions, got {type(captions).__name__}")
    builder = _RecordBuilder()
    for line_no, line in enumerate(text_lines(read_text(annotations)), start=1):
        video_id = line.strip()
        if not video_id:
            continue
        where = f"line {line_no}"
        with located_errors(annotations, where):
            pool = captions.get(video_id)
            if not isinstance(pool, (list, tuple)):
                raise ValueError(f"video {video_id!r} has no caption list in {captions_path}")
            builder.add(video_id, [_join_tokens(c) for c in pool], where)
    return builder.build(annotations, video_index_for(annotations, videos))


_LSMDC_COLUMNS = ("clip_id", "start_aligned", "end_aligned", "start_extracted", "end_extracted", "sentence")


def read_lsmdc(annotations: Path, videos: Path | None) -> list[VideoRecord]:
    """LSMDC in CLIP4Clip's layout: tab-separated, no header, six columns per line.

    ``clip_id, start_aligned, end_aligned, start_extracted, end_extracted, sentence`` (the
    ``LSMDC16_annos_*.csv`` and ``LSMDC16_challenge_1000_publictect.csv`` files). A clip id can
    repeat with several sentences; they are merged into its pool. The four times (as written) of a
    clip's first line go to meta. Clips live in per-movie subfolders, which the index searches.
    """
    builder = _RecordBuilder(merge=True)
    for line_no, line in enumerate(text_lines(read_text(annotations)), start=1):
        if not line.strip():
            continue
        where = f"line {line_no}"
        with located_errors(annotations, where):
            cells = line.split("\t")
            if len(cells) != len(_LSMDC_COLUMNS):
                raise ValueError(f"expected {len(_LSMDC_COLUMNS)} tab-separated columns, got {len(cells)}")
            row = dict(zip(_LSMDC_COLUMNS, cells, strict=True))
            times = {key: row[key] for key in _LSMDC_COLUMNS[1:5]}
            builder.add(row["clip_id"], [row["sentence"]], where, times)
    return builder.build(annotations, video_index_for(annotations, videos))


def read_jsonl_dataset(annotations: Path, videos: Path | None) -> list[VideoRecord]:
    """Our JSONL format (:func:`mama.data.records.read_jsonl`), caption sources kept as written.

    Without ``videos``, video paths are relative to the JSONL's folder. With a ``videos`` folder,
    each record's video is looked up there by the file name of its ``"video"`` field, then by its id.
    """
    records = read_jsonl(annotations)
    if videos is None:
        return records
    index = VideoIndex(videos)
    for record in records:
        record.video = index.resolve_first([record.video.name, record.id])
    return records


DATASET_FORMATS: dict[str, Reader] = {
    "jsonl": read_jsonl_dataset,
    "msrvtt": read_msrvtt,
    "msrvtt_clipvip": read_msrvtt_clipvip,
    "didemo": read_didemo,
    "activitynet": read_activitynet,
    "msvd": read_msvd,
    "lsmdc": read_lsmdc,
}


def read_dataset(
    format: str, annotations: str | os.PathLike[str], videos: str | os.PathLike[str] | None
) -> list[VideoRecord]:
    """Read one split of a dataset into :class:`VideoRecord` objects.

    Args:
        format: a key of :data:`DATASET_FORMATS` (layouts in the module docstring and docs/datasets.md).
        annotations: the split's annotation file; auxiliary files (MSR-VTT's ``MSRVTT_data.json``,
            MSVD's ``raw-captions.pkl``) are looked for next to it.
        videos: folder searched recursively for videos by id. None: for "jsonl", the paths written in
            the file (relative to its folder); for the benchmarks, the annotation file's folder.

    Returns:
        The records in annotation order, ids unique. A video that is not found gets its expected path
        (see :meth:`VideoIndex.resolve`); the loader reports and skips it.

    Raises:
        AnnotationError: a bad line or entry (the message names the file and where).
        ValueError: unknown format.
        FileNotFoundError: the annotation file, a needed auxiliary file or the videos folder is missing.
    """
    reader = DATASET_FORMATS.get(format)
    if reader is None:
        raise ValueError(f"unknown dataset format {format!r}; known formats: {', '.join(DATASET_FORMATS)}")
    return reader(Path(annotations), None if videos is None else Path(videos))


# Videos in the test split of a benchmark's standard protocol, where its annotation file fixes the count
# (docs/datasets.md): MSR-VTT 1k-A (JSFusion), MSVD's CLIP4Clip test list, LSMDC's public test, and
# ActivityNet Captions val_1, the split paragraph retrieval reports on.
PROTOCOL_TEST_VIDEOS: dict[str, tuple[str, int]] = {
    "msrvtt": ("MSR-VTT 1k-A test", 1000),
    "msvd": ("MSVD test", 670),
    "lsmdc": ("LSMDC test", 1000),
    "activitynet": ("ActivityNet Captions val_1", 4917),
}


def split_shortfall(format: str, split: str, annotation: Path, listed: int, kept: int) -> str | None:
    """What to tell the user when an evaluation split lost videos, or its size is not the protocol's.

    Args:
        format: the split's ``data.format``.
        split: "val" or "test" (the protocol size is stated for "test" only).
        annotation: the split's annotation file.
        listed: records read from it; ``kept``: those whose video was found and decoded.

    Returns:
        A message (for a warning) or None when every listed video is there and the protocol's count,
        where known, matches.
    """
    protocol = PROTOCOL_TEST_VIDEOS.get(format) if split == "test" else None
    if kept == listed and (protocol is None or protocol[1] == listed):
        return None
    message = f"{split}: evaluating on {kept} of the {listed} videos listed in {annotation}" + (
        f" ({listed - kept} missing or unreadable, skipped)" if kept < listed else ""
    )
    if protocol is not None:
        name, expected = protocol
        message += f"; the {name} protocol has {expected}, so these numbers are not comparable with published ones"
    return message
