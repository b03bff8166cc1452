"""Files mama writes get the usual permissions (umask), so teammates sharing a folder can read them.

Regression tests for issue class 7: checkpoints and exported models were written owner-only (0600 / 0700)
by safetensors and mkdtemp.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mama import fileio
from mama.checkpoint import load_checkpoint, save_checkpoint
from mama.config import ModelConfig
from mama.fileio import atomic_path, current_umask, default_mode
from mama.models import create_model, create_tokenizer, from_pretrained, save_pretrained


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def _assert_shared_modes(folder: Path) -> None:
    """Under umask 022: folders 0755, files 0644 (group and others may read)."""
    modes = _modes(folder)
    wrong = {name: oct(mode) for name, mode in modes.items() if mode != (0o755 if (folder / name).is_dir() else 0o644)}
    assert wrong == {}, f"not readable by group and others: {wrong}"


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_current_umask_reads_the_umask_without_changing_it(mask: int, monkeypatch: pytest.MonkeyPatch) -> None:
    old = os.umask(mask)
    try:
        assert current_umask() == mask
        assert default_mode() == 0o666 & ~mask and default_mode(directory=True) == 0o777 & ~mask
        monkeypatch.setattr(fileio, "_PROC_STATUS", "/nonexistent/status")  # systems without /proc
        assert current_umask() == mask
        assert os.umask(mask) == mask, "the umask was left changed"
    finally:
        os.umask(old)


def test_atomic_path_writes_with_the_umask_and_leaves_nothing_on_error(tmp_path: Path, umask_022: None) -> None:
    target = tmp_path / "file.bin"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"one")
        tmp.chmod(0o600)  # as mkstemp and safetensors leave it
        assert not target.exists()
    assert target.read_bytes() == b"one" and stat.S_IMODE(target.stat().st_mode) == 0o644
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"two")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"one" and sorted(tmp_path.iterdir()) == [target]


def test_checkpoints_are_readable_by_group_and_others(tmp_path: Path, umask_022: None) -> None:
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 3, {"model": {"w": torch.ones(2)}}, {"step": 3, "x": torch.zeros(1)})
    _assert_shared_modes(root)
    assert load_checkpoint(root).step == 3


def test_exported_models_are_readable_by_group_and_others(tmp_path: Path, umask_022: None) -> None:
    cfg = ModelConfig(embed_dim=16, width=32, heads=2, video_layers=1, text_layers=1, stem_channels=4,
                      frame_size=32, max_frames=4, max_text_length=16)  # fmt: skip
    tokenizer = create_tokenizer(cfg, ["a red circle moves left"])
    folder = save_pretrained(tmp_path / "model", cfg, create_model(cfg, tokenizer), tokenizer)
    _assert_shared_modes(folder)
    from_pretrained(folder)
    save_pretrained(folder, cfg, create_model(cfg, tokenizer), tokenizer)  # replacing an export: same modes
    _assert_shared_modes(folder)
