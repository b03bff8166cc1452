"""Run loggers behind one interface: an append-only JSON-lines file and TensorBoard event files.

Every record is a flat-ish dict with an int ``"step"``; evaluation records also carry
``"split": "val" | "test"``. Values are numbers, bools, strings, None, or nested dicts of those
(e.g. ``"weight_by_source": {"human": 1.02, "lvlm": 0.9}``). Only rank 0 writes: the engine builds
the loggers with ``enabled=False`` on the other ranks, which makes every method a no-op.

Files written under the run folder by :func:`build_loggers`::

    out_dir/log.jsonl                        "jsonl": one JSON object per line, as logged
    out_dir/tensorboard/events.out.tfevents.*  "tensorboard": one event file per (re)start;
                                             scalar tags "train/<key>", "val/<key>", "test/<key>",
                                             nested dicts as "<split>/<key>/<subkey>"

Resuming from a checkpoint at step ``S`` keeps what was logged at steps ``<= S`` and discards what a
crashed run logged after it, so a resumed run shows every step exactly once; a fresh run
(``resume_step=None``) discards everything an earlier run left in the same place.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = [
    "LOGGER_NAMES",
    "JsonlLogger",
    "Logger",
    "Loggers",
    "TensorBoardLogger",
    "build_loggers",
    "read_log",
]


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a run's JSONL log (``log.jsonl``, ``weights.jsonl``), oldest first; [] when there is
    none. A line cut short by a crash, or being written now, is skipped."""
    records: list[dict[str, Any]] = []
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


@runtime_checkable
class Logger(Protocol):
    """What the training engine logs through."""

    def log(self, record: dict[str, Any]) -> None:
        """Record one step's (or one evaluation's) values; ``record["step"]`` is always an int."""
        ...

    def close(self) -> None:
        """Flush and release whatever the logger holds; no ``log`` call follows."""
        ...


class JsonlLogger:
    """Append-only JSON-lines log that, on resume, drops lines from after the checkpoint's step.

    Layout: ``path`` holds one ``json.dumps(record)`` per line, in logging order.
    """

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled  # only rank 0 writes
        if not enabled:
            return
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if self._step_of(line) <= resume_step]
            # Rewrite through a temporary file so a crash here never leaves a half-written log.
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)
        elif path.exists():
            # A fresh run into an old run folder: the old lines describe another run.
            path.unlink()

    @staticmethod
    def _step_of(line: str) -> float:
        # A line cut short by a crash mid-write is dropped, not a reason to refuse to resume.
        try:
            return json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            return math.inf

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # Open per record (not once) so every line is on disk when the call returns, even if the run dies next.
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def close(self) -> None:
        # Nothing is held open between records.
        return None


_TENSORBOARD_MISSING = (
    "train.loggers includes 'tensorboard' but the tensorboard package is not installed: pip install 'mama[tensorboard]'"
)

# SummaryWriter's default is 120 s; a shorter interval keeps a live TensorBoard close to the run
# without flushing on every step.
_FLUSH_SECS = 30


def _scalars(record: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, float | int]]:
    """Yield ``(tag, value)`` for every numeric leaf, nested keys joined with "/"."""
    for key, value in record.items():
        tag = f"{prefix}/{key}"
        if isinstance(value, Mapping):
            yield from _scalars(value, tag)
        # bool is an int subclass, but a flag plotted as 0/1 is noise; None and strings have no scalar.
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield tag, value


class TensorBoardLogger:
    """Writes every numeric value of a record as a TensorBoard scalar at ``global_step=record["step"]``.

    Layout: ``log_dir/events.out.tfevents.<time>.<host>.<pid>.<n>``, one file per writer (a resumed
    run adds a file). Tags are ``"train/<key>"`` for training records and ``"<split>/<key>"`` for
    evaluation records (``"val/t2v_r1"``); nested dicts become ``"<prefix>/<key>/<subkey>"``.
    """

    def __init__(self, log_dir: Path, resume_step: int | None, enabled: bool = True) -> None:
        self.log_dir = log_dir
        self.enabled = enabled  # only rank 0 writes
        self._writer: SummaryWriter | None = None
        if not enabled:
            # Neither import tensorboard nor create the folder: other ranks may not even have it installed.
            return
        try:
            # Imported here, not at module level, so tensorboard stays an optional dependency.
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(_TENSORBOARD_MISSING) from err
        if resume_step is None:
            # A fresh run: earlier event files in this folder describe another run (as log.jsonl is deleted).
            for old in log_dir.glob("events.out.tfevents.*"):
                old.unlink()
        # Event files are append-only, so a resume cannot cut the crashed run's tail out of them. Instead
        # the new file starts with a SessionLog.START at purge_step, and readers (EventAccumulator, the
        # TensorBoard UI) drop every earlier event whose step is >= purge_step. The checkpoint's own step
        # was logged before it was saved, so keep it: purge from resume_step + 1, as log.jsonl keeps
        # steps <= resume_step.
        purge_step = None if resume_step is None else resume_step + 1
        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=_FLUSH_SECS)

    def log(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            return
        step = int(record["step"])
        prefix = record.get("split") or "train"
        body = {key: value for key, value in record.items() if key not in ("step", "split")}
        for tag, value in _scalars(body, prefix):
            self._writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        if self._writer is None:
            return
        # close() flushes pending events; per-record flushes are left to flush_secs / max_queue.
        self._writer.close()
        self._writer = None


class Loggers:
    """Several loggers used as one: ``log`` fans a record out to each, ``close`` closes each."""

    def __init__(self, loggers: Sequence[Logger]) -> None:
        self.loggers: list[Logger] = list(loggers)

    def log(self, record: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(record)

    def close(self) -> None:
        # Close every logger even if one fails, so one bad sink does not lose another's buffered events.
        error: BaseException | None = None
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as exc:  # re-raised below, after the others are closed
                if error is None:
                    error = exc
        if error is not None:
            raise error


LOGGER_NAMES: tuple[str, ...] = ("jsonl", "tensorboard")


def check_loggers(names: Sequence[str]) -> None:
    """Refuse unknown or repeated logger names, and a TensorBoard logger without its package, before a
    run starts (every rank calls it, so no rank waits in a collective for one that failed)."""
    unknown = [name for name in names if name not in LOGGER_NAMES]
    if unknown:
        raise ValueError(f"unknown logger(s) {unknown}; allowed: {list(LOGGER_NAMES)}")
    duplicated = sorted({name for name in names if list(names).count(name) > 1})
    if duplicated:
        raise ValueError(f"logger(s) {duplicated} listed more than once; each would write the same records twice")
    if "tensorboard" in names:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError as err:
            raise ImportError(_TENSORBOARD_MISSING) from err


def build_loggers(names: Sequence[str], out_dir: Path, resume_step: int | None, enabled: bool) -> Loggers:
    """Build the named loggers for a run folder.

    ``"jsonl"`` writes ``out_dir/log.jsonl`` and ``"tensorboard"`` writes ``out_dir/tensorboard/``.
    ``resume_step`` is the checkpoint step a resumed run starts from (None for a fresh run);
    ``enabled`` is False on every rank but 0.
    """
    # Validate every name before building any logger: building one may already delete an old log.
    check_loggers(names)
    loggers: list[Logger] = []
    for name in names:
        if name == "jsonl":
            loggers.append(JsonlLogger(out_dir / "log.jsonl", resume_step, enabled=enabled))
        else:
            loggers.append(TensorBoardLogger(out_dir / "tensorboard", resume_step, enabled=enabled))
    return Loggers(loggers)
