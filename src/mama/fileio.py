"""File modes for what mama writes: the usual permissions, whichever library wrote the file.

``tempfile.mkstemp`` / ``mkdtemp`` and safetensors' ``save_file`` create owner-only files and folders
(0600 / 0700) instead of honouring the umask, so a frame cache, checkpoint or exported model written
through them would be unreadable to a teammate sharing the folder. Everything mama writes through such a
writer is given the mode a plain ``open()`` or ``mkdir()`` would have: ``0o666 & ~umask`` for files and
``0o777 & ~umask`` for folders.

This module imports nothing of mama, so every layer can use it.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "current_umask", "default_mode", "fsync_path", "set_default_mode", "sha256_file"]

_UMASK_LOCK = threading.Lock()
_PROC_STATUS = "/proc/self/status"


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows.

    Linux (>= 4.7) reports it in ``/proc/self/status``, which reads it without a race. Elsewhere the only
    way is ``os.umask(x); os.umask(old)``, which briefly sets ``x`` for every thread of the process; ``x``
    is 0o077 there, so a file another thread creates in that window is owner-only, never world-writable.
    """
    try:
        with open(_PROC_STATUS, encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o077)
        os.umask(old)
    return old


def default_mode(directory: bool = False) -> int:
    """The permission bits ``open()`` (``directory=False``) or ``mkdir()`` would give a new entry now."""
    return (0o777 if directory else 0o666) & ~current_umask()


def set_default_mode(path: str | os.PathLike[str]) -> None:
    """Give ``path`` (a file or folder we just created) the permissions of :func:`default_mode`."""
    os.chmod(path, default_mode(directory=os.path.isdir(path)))


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Write a file atomically: yields a temporary sibling of ``path`` to write to; when the block ends
    without an error it gets the default mode and replaces ``path``, otherwise it is removed.

    Readers never see a half-written ``path``; the temporary name is hidden and unique per call.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        set_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (memory flat in the file's size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's data, or a folder's entries (new files, renames), to disk. Folders cannot be
    opened for fsync on Windows, hence a no-op there."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
