"""The pretrained starting point of SynthVL fine-tuning: MAMA's regime in miniature.

MAMA fine-tunes a CLIP pretrained on image-text pairs: it already knows what things look like, and the
video data must teach it what happens over time, from captions of mixed quality. The SynthVL analogue:
a clean, balanced corpus of SynthVL clips (its own seed, so no clip of the fine-tuning data is in it)
whose captions never mention the motion, like the alt text of a still image. The model pretrained on it
learns colour, shape, size and background; the fine-tuning data's captions add the motion, with the
long tail, vague and hallucinated captions of the LVLM-augmented training split.

Pretraining is deterministic (fixed seed, data and thread count) and cached like a downloaded
checkpoint: :func:`ensure_pretrained` trains once, exports the model under a folder named by a hash of
every setting, and returns that folder on later calls. The model of the default settings also ships with
the package (``pretrained/synthvl-<key>``, 4 MB, with the sha256 of every file), like a released CLIP
checkpoint: the demo starts from it instead of spending two minutes pretraining, and
``mama demo --train-pretrained`` trains it again and says whether the result is byte-identical.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from mama.config import load_config
from mama.data.records import read_jsonl
from mama.data.synthvl import SynthConfig, caption_words, generate
from mama.inference.embed import export_pretrained
from mama.models import create_tokenizer
from mama.tasks import train
from mama.tasks.retrieval import load_data

__all__ = [
    "PRETRAIN_CORPUS",
    "PRETRAIN_OVERRIDES",
    "SHIPPED_DIR",
    "ShippedModelError",
    "compare_with_shipped",
    "ensure_pretrained",
    "pretrain_key",
    "quick_pretraining",
    "shipped_model",
]

# Pretrained models that ship with the package, one folder per pretrain_key.
SHIPPED_DIR = Path(__file__).resolve().parent / "pretrained"
PROVENANCE = "provenance.json"

# Clean and balanced (no long tail, no LVLM noise), captions without the motion; the small meta / val /
# test splits only satisfy the generator (pretraining evaluates on its own val split).
PRETRAIN_CORPUS = SynthConfig(
    seed=1,
    num_train=1000,
    num_meta=30,
    num_val=60,
    num_test=30,
    zipf_a=0.0,
    human_captions=1,
    lvlm_captions=1,
    hallucination_rate=0.0,
    vague_rate=0.0,
    caption_motion=False,
)
# Plain InfoNCE from scratch. Two threads whatever the machine: the summation order, hence the weights,
# then depend only on the CPU's instruction set.
PRETRAIN_OVERRIDES = [
    "loss.margin=0.0",
    "meta.enabled=false",
    "train.seed=0",
    "train.steps=600",
    "train.batch_size=64",
    "train.threads=2",
    "train.log_every=100",
    "eval.split=val",
]


def quick_pretraining() -> tuple[SynthConfig, list[str]]:
    """A smaller corpus and a shorter run, for ``mama demo --quick`` (smoke tests)."""
    corpus = dataclasses.replace(PRETRAIN_CORPUS, num_train=300)
    return corpus, [*PRETRAIN_OVERRIDES, "train.steps=60"]


def pretrain_key(corpus: SynthConfig = PRETRAIN_CORPUS, overrides: list[str] | None = None) -> str:
    """Short hash of every setting that shapes the pretrained weights."""
    payload = {"corpus": dataclasses.asdict(corpus), "overrides": overrides or PRETRAIN_OVERRIDES, "version": 1}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


class ShippedModelError(RuntimeError):
    """A shipped pretrained model whose files do not match the checksums recorded beside them."""


def _file_hashes(folder: Path, names: list[str]) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in names}


def shipped_model(key: str, shipped_dir: Path = SHIPPED_DIR) -> Path | None:
    """The shipped model folder of ``key`` after checking every file against its recorded sha256, or
    None when none ships for these settings. A damaged copy (e.g. a Git LFS pointer or a truncated
    checkout) raises :class:`ShippedModelError` naming the file."""
    folder = shipped_dir / f"synthvl-{key}"
    if not (folder / PROVENANCE).is_file():
        return None
    provenance: dict[str, Any] = json.loads((folder / PROVENANCE).read_text(encoding="utf-8"))
    for name, expected in provenance["files"].items():
        path = folder / name
        if not path.is_file():
            raise ShippedModelError(f"{path}: missing from the shipped pretrained model (reinstall mama)")
        if _file_hashes(folder, [name])[name] != expected:
            raise ShippedModelError(
                f"{path}: sha256 differs from {folder / PROVENANCE} (a damaged copy; reinstall mama, or train it "
                "with `mama demo --train-pretrained`)"
            )
    return folder


def compare_with_shipped(model_dir: Path, shipped_dir: Path = SHIPPED_DIR) -> dict[str, bool] | None:
    """Per file of the shipped model of the same settings: whether ``model_dir`` (a model trained here,
    ``model-<key>``) holds the same bytes. None when no model ships for these settings."""
    key = Path(model_dir).name.removeprefix("model-")
    folder = shipped_dir / f"synthvl-{key}"
    if not (folder / PROVENANCE).is_file():
        return None
    recorded: dict[str, str] = json.loads((folder / PROVENANCE).read_text(encoding="utf-8"))["files"]
    return {
        name: (Path(model_dir) / name).is_file() and _file_hashes(Path(model_dir), [name])[name] == digest
        for name, digest in recorded.items()
    }


def ensure_pretrained(
    cache: str | Path = Path("data/synthvl_pretrain"),
    corpus: SynthConfig = PRETRAIN_CORPUS,
    overrides: list[str] | None = None,
    progress: bool = True,
    use_shipped: bool = True,
    shipped_dir: Path = SHIPPED_DIR,
) -> Path:
    """The exported pretrained model (a ``mama export`` folder for ``model.pretrained``): a model trained
    here before (``cache``), else the shipped one of the same settings (``use_shipped``), else trained now.
    ``cache`` holds the corpus, the pretraining run and the model, each named by :func:`pretrain_key`, so a
    change of any setting trains a new model instead of reusing a stale one."""
    overrides = list(overrides or PRETRAIN_OVERRIDES)
    key = pretrain_key(corpus, overrides)
    cache = Path(cache)
    model_dir = cache / f"model-{key}"
    if (model_dir / "config.json").is_file():
        print(f"pretrained SynthVL model: reusing {model_dir}", file=sys.stderr, flush=True)
        return model_dir
    shipped = shipped_model(key, shipped_dir) if use_shipped else None
    if shipped is not None:
        print(f"pretrained SynthVL model: the shipped one, {shipped} (checksums verified)", file=sys.stderr, flush=True)
        return shipped
    print(f"pretrained SynthVL model: training it once into {model_dir}", file=sys.stderr, flush=True)
    corpus_dir = generate(cache / f"corpus-{key}", corpus, progress=progress)
    run_dir = cache / f"run-{key}"
    cfg = load_config(
        None,
        [
            f"data.root={corpus_dir}",
            "data.synthvl=false",
            *overrides,
            f"train.out_dir={run_dir}",
            "train.overwrite=true",
            f"train.progress={str(progress).lower()}",
        ],
    )
    # The vocabulary covers every SynthVL caption word, the motion words the corpus never uses included,
    # as a pretrained CLIP's BPE covers words its captions never had.
    texts = [c.text for r in read_jsonl(corpus_dir / "train.jsonl") for c in r.captions] + [" ".join(caption_words())]
    tokenizer = create_tokenizer(cfg.model, texts)
    data = load_data(cfg, ("train", "val", "test"), tokenizer=tokenizer, progress=progress)
    train(cfg, data=data)
    return export_pretrained(run_dir, model_dir)
