"""Commands that do not train stay light: ``mama --help``, ``mama keyframes`` and ``mama search``
(up to loading its model) never import torch or transformers. Each case runs in a fresh
interpreter, so a future top-level ``import torch`` anywhere on these paths fails here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mama.data.sampling import uniform_indices, uniform_indices_array
from mama.data.video import write_video

HEAVY = ("torch", "transformers")

_RUNNER = """
import contextlib, io, json, sys
import mama.cli
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        code = mama.cli.main(json.loads(sys.argv[1]))
    except SystemExit as exc:  # --help exits
        code = exc.code
print(json.dumps({"code": code, "stdout": out.getvalue(), "loaded": [m for m in json.loads(sys.argv[2]) if m in sys.modules]}))
"""


def _run_cli(argv: list[str]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(argv), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-s clip with a cut to a brighter scene halfway."""
    frames = np.zeros((50, 64, 96, 3), dtype=np.uint8)
    frames[:, :, :, 0] = np.arange(96, dtype=np.uint8)[None, None, :]
    frames[25:] += 120
    return write_video(tmp_path_factory.mktemp("cli_light") / "clip.mp4", frames, fps=25)


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["keyframes", "--help"], ["search", "--help"], ["caption", "--help"], ["augment", "--help"]],
    ids=lambda argv: " ".join(argv),
)
def test_help_imports_neither_torch_nor_transformers(argv: list[str]) -> None:
    result = _run_cli(argv)
    assert result["code"] == 0
    assert "usage: " in result["stdout"]
    assert result["loaded"] == []


def test_keyframes_json_imports_neither_torch_nor_transformers(clip: Path) -> None:
    result = _run_cli(["keyframes", str(clip), "--json", "--num", "4"])
    assert result["code"] == 0
    assert result["loaded"] == []
    summary = json.loads(result["stdout"])
    assert summary["num_frames"] == 50 and len(summary["keyframes"]) == 4
    assert any(abs(peak - 25) <= 1 for peak in summary["peaks"])


def test_keyframes_error_is_one_line_without_torch(tmp_path: Path) -> None:
    result = _run_cli(["keyframes", str(tmp_path / "missing.mp4"), "--json"])
    assert result["code"] == 2
    assert result["loaded"] == []


def test_torch_free_uniform_indices_equal_the_tensor_ones() -> None:
    for available in (0, 1, 2, 7, 12, 13, 100, 1001):
        for frames in (0, 1, 3, 8, 12, 32):
            if available == 0 and frames:
                continue
            expected = uniform_indices(available, frames) if available else np.zeros(0, dtype=np.int64)
            assert np.array_equal(uniform_indices_array(available, frames), np.asarray(expected))
