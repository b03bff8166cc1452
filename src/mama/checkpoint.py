"""Checkpoints as a directory of safetensors files plus JSON, written atomically.

Layout of ``root/step_00001000/``::

    <name>.safetensors          one per entry of ``tensors`` (e.g. model.safetensors, wnet.safetensors)
    state.json                  everything else (step counters, config, optimizer hyper-parameters, RNG states)
    state_tensors.safetensors   tensors found inside ``state``, referenced from state.json
    manifest.json               size and sha256 of every other file, to detect partial or corrupt copies

``root/latest`` holds the name of the newest step directory. A checkpoint is first written to a
hidden ``root/.tmp_step_*`` sibling and renamed into place, so a crash leaves either the previous
checkpoint set or the new complete one, plus at worst a stray ``.tmp_*`` directory that readers
ignore. No pickle is involved: loading a checkpoint cannot execute code.

How ``state`` is encoded in state.json: JSON values stay as they are; a tensor becomes
``{"__tensor__": key}``, a numpy array ``{"__ndarray__": key, "dtype": ...}`` and a numpy scalar
``{"__npscalar__": value, "dtype": ...}``; a tuple becomes ``{"__tuple__": [...]}`` (so
``random.setstate``, which insists on tuples, accepts the restored state); a dict whose keys are not
all strings (e.g. the int parameter ids of an optimizer state_dict) becomes
``{"__dict__": [[key, value], ...]}`` so key types survive the round trip.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load, save, save_file
from torch import Tensor

from mama.fileio import fsync_path, set_default_mode, sha256_file

__all__ = ["Checkpoint", "CheckpointError", "find_latest_checkpoint", "load_checkpoint", "save_checkpoint"]

MANIFEST = "manifest.json"
STATE_JSON = "state.json"
STATE_TENSORS = "state_tensors"  # file stem, so it is reserved as a ``tensors`` group name
LATEST = "latest"
FORMAT_NAME = "mama-checkpoint"
FORMAT_VERSION = 1

_STEP_DIR_RE = re.compile(r"^step_(\d+)$")
_GROUP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SCALAR_KEYS_METADATA = "mama_scalar_keys"
_TENSOR, _NDARRAY, _NPSCALAR, _TUPLE, _DICT = "__tensor__", "__ndarray__", "__npscalar__", "__tuple__", "__dict__"
_MARKERS = frozenset({_TENSOR, _NDARRAY, _NPSCALAR, _TUPLE, _DICT})


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing files, truncated, corrupt or not a checkpoint."""


@dataclass
class Checkpoint:
    """A loaded checkpoint; all tensors are on CPU.

    Attributes:
        step: training step it was saved at.
        tensors: ``{group: {tensor name: tensor}}``, e.g. ``{"model": state_dict, "wnet": ...}``.
        state: the ``state`` dict passed to :func:`save_checkpoint`, with tensors restored
            (tuples restored as tuples).
        path: the step directory it was read from.
    """

    step: int
    tensors: dict[str, dict[str, Tensor]]
    state: dict[str, Any]
    path: Path


# ---------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(
    root: Path,
    step: int,
    tensors: Mapping[str, Mapping[str, Tensor]],
    state: Mapping[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Atomically write ``root/step_{step:08d}/`` and point ``root/latest`` at it.

    Args:
        root: directory holding all checkpoints of a run (created if missing).
        step: training step, >= 0. An existing checkpoint of the same step is replaced.
        tensors: ``{group: state_dict}``; each group becomes ``<group>.safetensors``. Tensors may
            live on any device and may share memory or be non-contiguous; they are copied to CPU.
        state: JSON-able nested data that may also hold tensors, numpy arrays/scalars, tuples and
            non-string dict keys (optimizer state_dicts, RNG states, the resolved config, ...).
        keep_last: if given, delete older step directories so that only this many remain; the one
            just written is always kept, the others are kept by highest step number.

    Returns:
        The step directory written.
    """
    root = Path(root)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    for group in tensors:
        if not _GROUP_NAME_RE.match(group) or group == STATE_TENSORS:
            raise ValueError(f"invalid tensors group name {group!r}: need a plain file stem, not {STATE_TENSORS!r}")

    # Encode before touching the disk so an unsupported value fails without leaving debris.
    state_tensors: dict[str, Tensor] = {}
    state_json = json.dumps(_encode(dict(state), "", state_tensors), indent=1, allow_nan=True)

    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final_dir = root / name
    # A unique temporary name so two writers (or a rerun after a crash) never share a directory.
    tmp_dir = root / f".tmp_{name}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    try:
        files: dict[str, dict[str, Any]] = {}
        for group, group_tensors in tensors.items():
            filename = f"{group}.safetensors"
            files[filename] = _write_safetensors(tmp_dir / filename, dict(group_tensors))
        state_tensors_file = f"{STATE_TENSORS}.safetensors"
        files[state_tensors_file] = _write_safetensors(tmp_dir / state_tensors_file, state_tensors)
        files[STATE_JSON] = _write_bytes(tmp_dir / STATE_JSON, state_json.encode())
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "step": step,
            "tensor_groups": list(tensors),
            "files": files,
        }
        _write_bytes(tmp_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
        fsync_path(tmp_dir)
        _move_into_place(tmp_dir, final_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    write_text_atomic(root / LATEST, name + "\n")
    if keep_last is not None:
        _prune(root, keep=final_dir, keep_last=keep_last)
    return final_dir


def _to_storable(tensor: Tensor) -> Tensor:
    """A contiguous CPU copy that owns its memory (safetensors rejects views and shared storage)."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"expected a tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise TypeError(f"only dense tensors can be saved, got layout {tensor.layout}")
    # One copy does everything: moves off the accelerator, packs strides, breaks storage sharing.
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu").copy_(tensor.detach())


@functools.cache
def _safetensors_keeps_scalars() -> bool:
    """Whether the installed safetensors round-trips 0-d tensors (old releases reject or reshape them)."""
    try:
        restored = load(save({"x": torch.zeros(())}))
    except Exception:  # whatever an old release raises, the answer is "no"
        return False
    return restored["x"].shape == ()


def _write_safetensors(path: Path, tensors: dict[str, Tensor]) -> dict[str, Any]:
    storable = {key: _to_storable(value) for key, value in tensors.items()}
    metadata: dict[str, str] = {}
    if not _safetensors_keeps_scalars():
        scalar_keys = sorted(key for key, value in storable.items() if value.ndim == 0)
        if scalar_keys:
            # Stored as shape (1,); the metadata lets the loader give them back their 0-d shape.
            metadata[_SCALAR_KEYS_METADATA] = json.dumps(scalar_keys)
            storable.update({key: storable[key].reshape(1) for key in scalar_keys})
    save_file(storable, path, metadata=metadata or None)
    set_default_mode(path)  # save_file makes it owner-only (0600)
    _fsync_file(path)
    return file_record(path)


def _write_bytes(path: Path, data: bytes) -> dict[str, Any]:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_text_atomic(path: Path, text: str) -> None:
    tmp_path = path.with_name(f".{path.name}.tmp_{os.getpid()}_{uuid.uuid4().hex[:8]}")
    try:
        _write_bytes(tmp_path, text.encode())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def _move_into_place(tmp_dir: Path, final_dir: Path) -> None:
    """Rename ``tmp_dir`` to ``final_dir``, replacing an existing checkpoint of the same step."""
    old_dir = None
    if final_dir.exists():
        # os.replace cannot overwrite a non-empty directory; move the old one aside first. Between
        # the two renames the step is briefly absent, which readers handle by falling back.
        old_dir = final_dir.with_name(f".tmp_old_{final_dir.name}_{uuid.uuid4().hex[:8]}")
        os.replace(final_dir, old_dir)
    os.replace(tmp_dir, final_dir)
    fsync_path(final_dir.parent)
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def file_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, dir)`` of every ``step_*`` directory under ``root``, newest first (ignores ``.tmp_*``)."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found, key=lambda item: item[0], reverse=True)


def _prune(root: Path, keep: Path, keep_last: int) -> None:
    others = [path for _, path in _step_dirs(root) if path != keep]
    for path in others[keep_last - 1 :]:
        shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------
# Encoding nested state


def _encode(value: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    """JSON-able form of ``value``; tensors and arrays are moved into ``tensors`` under path-like keys."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic):  # before int/float: np.float64 subclasses float
        return {_NPSCALAR: value.item(), "dtype": value.dtype.str}
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, Tensor):
        return {_TENSOR: _add_tensor(tensors, path, value)}
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError(f"cannot save object array at {path or '/'}")
        array_tensor = torch.from_numpy(np.ascontiguousarray(value))
        return {_NDARRAY: _add_tensor(tensors, path, array_tensor), "dtype": value.dtype.str}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(item, f"{path}/{i}", tensors) for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(item, f"{path}/{i}", tensors) for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(key, str) for key in value) and not _MARKERS.intersection(value):
            return {key: _encode(item, f"{path}/{key}", tensors) for key, item in value.items()}
        items = []
        for key, item in value.items():
            if isinstance(key, (Tensor, np.ndarray)):
                raise TypeError(f"tensor dict keys are not supported (at {path or '/'})")
            items.append([_encode(key, f"{path}/<key>", tensors), _encode(item, f"{path}/{key}", tensors)])
        return {_DICT: items}
    raise TypeError(f"cannot save value of type {type(value).__name__} at {path or '/'} in checkpoint state")


def _add_tensor(tensors: dict[str, Tensor], path: str, tensor: Tensor) -> str:
    key = path.lstrip("/") or "<root>"
    unique_key, suffix = key, 1
    while unique_key in tensors:  # paths can collide, e.g. dict keys 0 and "0"
        unique_key, suffix = f"{key}~{suffix}", suffix + 1
    tensors[unique_key] = tensor
    return unique_key


def _decode(value: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        return tensors[value[_TENSOR]]
    if _NDARRAY in value:
        return tensors[value[_NDARRAY]].numpy().astype(np.dtype(value["dtype"]), copy=False)
    if _NPSCALAR in value:
        return np.dtype(value["dtype"]).type(value[_NPSCALAR])
    if _TUPLE in value:
        return tuple(_decode(item, tensors) for item in value[_TUPLE])
    if _DICT in value:
        return {_decode_key(key, tensors): _decode(item, tensors) for key, item in value[_DICT]}
    return {key: _decode(item, tensors) for key, item in value.items()}


def _decode_key(key: Any, tensors: Mapping[str, Tensor]) -> Any:
    decoded = _decode(key, tensors)
    return tuple(decoded) if isinstance(decoded, list) else decoded  # keep it hashable


# ---------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(path: Path) -> Checkpoint:
    """Load and verify a checkpoint.

    Args:
        path: a ``step_*`` directory, or a checkpoint root, in which case the checkpoint named by
            ``root/latest`` is loaded, falling back to the newest step directory that verifies.

    Raises:
        CheckpointError: the step directory is incomplete or corrupt (message names the file), or
            a root holds step directories but none verifies.
        FileNotFoundError: ``path`` does not exist or a root holds no checkpoint at all.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if _STEP_DIR_RE.match(path.name) or (path / MANIFEST).exists():
        return _load_verified(path, _verify(path))
    found = _find_latest_verified(path)
    if found is None:
        if _step_dirs(path):
            raise CheckpointError(f"no step directory under {path} passes verification")
        raise FileNotFoundError(f"no checkpoint under {path}")
    return _load_verified(*found)


def find_latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``root/latest`` names if it verifies, else the highest-step one that does.

    ``latest`` is preferred over the highest step number because after a resume from an older
    checkpoint the abandoned run's later steps may still be on disk. Corrupt checkpoints are
    skipped with a warning. Returns ``None`` when nothing under ``root`` verifies.
    """
    found = _find_latest_verified(Path(root))
    return None if found is None else found[0]


def _find_latest_verified(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """``(step dir, manifest)`` for :func:`find_latest_checkpoint`, so loading need not hash twice."""
    candidates = [path for _, path in _step_dirs(root)]
    latest_file = root / LATEST
    if latest_file.is_file():
        named = root / latest_file.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
        else:
            warnings.warn(f"{latest_file} names missing checkpoint {named.name!r}; searching {root}", stacklevel=3)
    for candidate in candidates:
        try:
            return candidate, _verify(candidate)
        except CheckpointError as error:
            warnings.warn(f"skipping corrupt checkpoint: {error}", stacklevel=3)
    return None


def _verify(step_dir: Path) -> dict[str, Any]:
    """Check every file in the manifest against its size and sha256; return the manifest."""
    manifest_path = step_dir / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: missing (incomplete checkpoint?)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{manifest_path}: unreadable JSON ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{manifest_path}: not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path}: unsupported format version {manifest.get('version')!r}")
    files = manifest.get("files", {})
    for required in (STATE_JSON, f"{STATE_TENSORS}.safetensors"):
        if required not in files:
            raise CheckpointError(f"{manifest_path}: does not list {required}")
    for filename, record in files.items():
        file_path = step_dir / filename
        if Path(filename).name != filename or not isinstance(record, dict) or set(record) != {"bytes", "sha256"}:
            raise CheckpointError(f"{manifest_path}: malformed entry for {filename!r}")
        if not file_path.is_file():
            raise CheckpointError(f"{file_path}: missing")
        size = file_path.stat().st_size
        if size != record["bytes"]:
            raise CheckpointError(f"{file_path}: size {size} bytes, manifest says {record['bytes']} (truncated?)")
        if sha256_file(file_path) != record["sha256"]:
            raise CheckpointError(f"{file_path}: sha256 mismatch (corrupt)")
    return manifest


def _load_verified(step_dir: Path, manifest: dict[str, Any]) -> Checkpoint:
    groups = manifest.get("tensor_groups")
    if not isinstance(groups, list) or not all(f"{group}.safetensors" in manifest["files"] for group in groups):
        raise CheckpointError(f"{step_dir / MANIFEST}: tensor_groups missing or not listed in files")
    tensors = {group: _read_safetensors(step_dir / f"{group}.safetensors") for group in groups}
    state_tensors = _read_safetensors(step_dir / f"{STATE_TENSORS}.safetensors")
    state_path = step_dir / STATE_JSON
    try:
        state = _decode(json.loads(state_path.read_text()), state_tensors)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{state_path}: cannot decode ({error!r})") from error
    return Checkpoint(step=int(manifest["step"]), tensors=tensors, state=state, path=step_dir)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            scalar_keys = set(json.loads((f.metadata() or {}).get(_SCALAR_KEYS_METADATA, "[]")))
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as error:  # safetensors raises its own error types for malformed files
        raise CheckpointError(f"{path}: unreadable safetensors ({error})") from error
    for key in scalar_keys:
        tensors[key] = tensors[key].reshape(())
    return tensors
