"""Shared fixtures: a tiny SynthVL generated once per session and overrides for a seconds-long run."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Tests never reach the network, even if a model behind the registry would like to download weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# 120 train videos (7 steps per epoch at batch 16) and one meta / val / test clip per concept, so all
# three frequency buckets appear in every evaluation split. 8 frames of 32 px keep decoding in seconds.
TINY_SYNTH = {"num_train": 120, "num_meta": 30, "num_val": 30, "num_test": 30, "num_frames": 8, "size": 32}


def _tiny_overrides(root: str | Path, out_dir: str | Path) -> list[str]:
    """Dotted overrides for a ~1 s CPU run of 6 steps on the tiny SynthVL at ``root``.

    ``data.synthvl=false``: the data already exists and ``load_data`` must not regenerate it (its
    SynthVL check compares against the default settings times a scale, which the tiny set is not).
    """
    return [
        f"data.root={root}",
        "data.synthvl=false",
        "data.num_frames=4",
        "data.frame_size=16",
        "model.frame_size=16",
        "model.width=32",
        "model.heads=2",
        "model.embed_dim=16",
        "model.video_layers=1",
        "model.text_layers=1",
        "model.stem_channels=4",
        "model.max_frames=8",
        "train.batch_size=16",
        "meta.batch_size=16",
        "train.steps=6",
        "train.progress=false",
        "train.log_every=2",
        "train.device=cpu",  # bitwise resume checks assume CPU kernels
        f"train.out_dir={out_dir}",
    ]


@pytest.fixture(scope="session")
def tiny_synthvl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SynthVL dataset folder, shared read-only by the whole session (copy it to damage it)."""
    from mama.data.synthvl import SynthConfig, generate

    return generate(tmp_path_factory.mktemp("tiny_synthvl"), SynthConfig(seed=0, **TINY_SYNTH), progress=False)


@pytest.fixture(scope="session")
def tiny_overrides() -> Callable[[str | Path, str | Path], list[str]]:
    """``tiny_overrides(root, out_dir)`` -> dotted overrides for a fast run (see ``_tiny_overrides``)."""
    return _tiny_overrides


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP and its tokenizer saved like a hub checkpoint (``model.pretrained`` = this folder)."""
    from tiny_clip import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaVA-1.5 and its processor saved like a hub checkpoint (``CaptionConfig.model`` = this)."""
    from tiny_llava import save_tiny_llava

    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test with one torch thread: tiny tensors gain nothing from a second thread, and on a busy
    2-core machine the contention makes small ops 10-100x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_qa_data(tiny_synthvl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SynthVL plus its SynthVL QA files (open-ended and multiple choice), shared read-only."""
    import shutil

    from mama.data.synthvl_qa import write_synthvl_qa

    root = tmp_path_factory.mktemp("tiny_qa") / "data"
    shutil.copytree(tiny_synthvl, root, ignore=shutil.ignore_patterns(".cache"))
    write_synthvl_qa(root)
    return root
