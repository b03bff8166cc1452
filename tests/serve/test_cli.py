"""`mama serve --help` stays light: gradio (about 12 s to import), torch and transformers load only when
the app starts."""

from __future__ import annotations

import json
import subprocess
import sys

_RUNNER = """
import contextlib, io, json, sys
import mama.cli
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        mama.cli.main(["serve", "--help"])
    except SystemExit:
        pass
print(json.dumps({"help": out.getvalue(), "loaded": [m for m in ("gradio", "torch", "transformers") if m in sys.modules]}))
"""


def test_serve_help_imports_neither_gradio_nor_torch() -> None:
    done = subprocess.run([sys.executable, "-c", _RUNNER], capture_output=True, text=True, check=True, timeout=120)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    for flag in ("--index", "--model", "--host", "--port", "--captioner", "--runs", "--max-upload-mb"):
        assert flag in result["help"]
    assert "127.0.0.1" in result["help"]
