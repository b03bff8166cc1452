"""An index of tiny SynthVL videos embedded by the shipped pretrained SynthVL model, and a tiny MAMA run.

The shipped model (mama/demos/pretrained, 4 MB) is a trained model that finds a caption's own video
among the 30 test videos most of the time, so searches show real results without training one here.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import mama.demos


def pretrained_model() -> Path:
    """The exported folder of the shipped pretrained SynthVL model."""
    return next((Path(mama.demos.__file__).parent / "pretrained").iterdir())


@pytest.fixture(scope="session")
def serve_index(tiny_synthvl: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"videos", "index", "model", "annotations"}: 12 test videos copied into a folder of their own
    (tests may add files next to them) and their index, built by the shipped pretrained model."""
    from mama.inference.embed import Encoder, build_index

    out = tmp_path_factory.mktemp("serve")
    videos = out / "videos"
    videos.mkdir()
    for path in sorted((tiny_synthvl / "videos" / "test").glob("*.mp4"))[:12]:
        shutil.copy(path, videos / path.name)
    encoder = Encoder.from_pretrained(pretrained_model())
    build_index(encoder, [(p.stem, p) for p in sorted(videos.glob("*.mp4"))], out / "index", progress=False)
    return {
        "videos": videos,
        "index": out / "index",
        "model": pretrained_model(),
        "annotations": tiny_synthvl / "test.jsonl",
    }


@pytest.fixture(scope="session")
def serve_runs(
    tiny_synthvl: Path,
    tiny_overrides: Callable[[str | Path, str | Path], list[str]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """A runs folder holding one 30-step MAMA run, ``tiny_mama`` (one torch thread: 2 s of training)."""
    import torch

    from mama.config import load_config
    from mama.tasks import train

    runs = tmp_path_factory.mktemp("serve_runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        overrides = tiny_overrides(tiny_synthvl, runs / "tiny_mama") + [
            "meta.enabled=true", "train.steps=30", "train.log_every=3", "train.log_weights_every=3",
            "optim.lr=2e-3", "meta.lr=1e-2",  # a weighting net that visibly learns within 30 steps
        ]  # fmt: skip
        train(load_config(None, overrides))
    finally:
        torch.set_num_threads(threads)
    return runs


@pytest.fixture(scope="session")
def serve_data(serve_index: dict[str, Path], serve_runs: Path) -> dict[str, Path]:
    """:func:`serve_index` plus "runs" (:func:`serve_runs`)."""
    return {**serve_index, "runs": serve_runs}
