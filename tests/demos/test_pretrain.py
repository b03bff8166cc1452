"""The pretrained starting point of the fine-tuning regime: trained once, cached by its settings, loaded
through ``model.pretrained`` with the vocabulary of every SynthVL caption."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mama.config import ConfigError, load_config
from mama.data.synthvl import SynthConfig
from mama.demos.pretrain import PRETRAIN_CORPUS, PRETRAIN_OVERRIDES, ensure_pretrained, pretrain_key
from mama.models import create_tokenizer
from mama.tasks.retrieval import build_retrieval_module

TINY_CORPUS = dataclasses.replace(
    PRETRAIN_CORPUS, num_train=48, num_meta=30, num_val=30, num_test=30, num_frames=8, size=32
)
TINY_MODEL = [
    "data.num_frames=4", "data.frame_size=16", "model.frame_size=16", "model.width=32", "model.heads=2",
    "model.embed_dim=16", "model.video_layers=1", "model.text_layers=1", "model.stem_channels=4", "model.max_frames=8",
    "train.device=cpu",
]  # fmt: skip
TINY_PRETRAINING = [*PRETRAIN_OVERRIDES, *TINY_MODEL, "train.steps=3", "train.batch_size=16", "train.threads=1"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_pretrained(tmp_path_factory.mktemp("cache"), TINY_CORPUS, TINY_PRETRAINING, progress=False)


def test_pretraining_runs_once_and_is_reused(pretrained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = (pretrained / "model.safetensors").read_bytes()
    run_metrics = pretrained.parent / f"run-{pretrain_key(TINY_CORPUS, TINY_PRETRAINING)}" / "metrics.json"
    stamp = run_metrics.stat().st_mtime_ns
    again = ensure_pretrained(pretrained.parent, TINY_CORPUS, TINY_PRETRAINING, progress=False)
    assert again == pretrained and (again / "model.safetensors").read_bytes() == weights
    assert run_metrics.stat().st_mtime_ns == stamp  # not trained again
    assert "reusing" in capsys.readouterr().err


def test_every_setting_names_its_own_model() -> None:
    base = pretrain_key(TINY_CORPUS, TINY_PRETRAINING)
    assert pretrain_key(dataclasses.replace(TINY_CORPUS, seed=2), TINY_PRETRAINING) != base
    assert pretrain_key(TINY_CORPUS, [*TINY_PRETRAINING, "train.steps=4"]) != base


def test_fine_tuning_starts_from_the_pretrained_weights_and_vocabulary(pretrained: Path) -> None:
    cfg = load_config(None, [*TINY_MODEL, f"model.pretrained={pretrained}"])
    # The corpus never names the motion, yet the tokenizer knows the motion words of the fine-tuning captions.
    tokenizer = create_tokenizer(cfg.model, ["ignored: the pretrained vocabulary wins"])
    ids, _ = tokenizer(["a small red circle moves left on a black background"])
    assert tokenizer.unk_id not in ids[0].tolist()
    module = build_retrieval_module(cfg, tokenizer)
    saved = load_file(str(pretrained / "model.safetensors"))
    state = module.model.state_dict()
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in saved)


def test_a_pretrained_model_of_another_shape_is_a_clear_error(pretrained: Path) -> None:
    cfg = load_config(None, [*TINY_MODEL, "model.width=64", f"model.pretrained={pretrained}"])
    tokenizer = create_tokenizer(cfg.model, [])
    with pytest.raises(ConfigError, match=r"width 32 \(config: 64\)"):
        build_retrieval_module(cfg, tokenizer)


def test_the_corpus_is_clean_balanced_and_motion_free() -> None:
    from mama.data.synthvl import make_records, parse_caption

    records = make_records(TINY_CORPUS)
    captions = [c for r in records["train"] for c in r["captions"]]
    assert {c["noise"] for c in captions} == {"none"}
    assert all(parse_caption(c["text"])["motion"] is None for c in captions)
    with pytest.raises(ValueError, match="caption_motion=False"):
        SynthConfig(caption_motion=False)  # the default noise rates are not zero


def test_fine_tuning_demo_reports_paired_gains(
    pretrained: Path, tiny_synthvl: Path, tiny_overrides: Callable[[Path, Path], list[str]], tmp_path: Path
) -> None:
    from mama.demos.retrieval import COMPARISONS, VARIANT_NAMES, run_demo

    out = tmp_path / "demo"
    overrides = [o for o in tiny_overrides(tiny_synthvl, out) if not o.startswith("train.out_dir=")]
    results = run_demo(
        out, seeds=[0, 1], overrides=[*overrides, "train.steps=2"], progress=False, pretrained=pretrained
    )
    assert results["regime"] == "finetune" and set(results["variants"]) == set(VARIANT_NAMES)
    assert results["config"]["model"]["pretrained"] == str(pretrained)
    for a, b in COMPARISONS:
        gain = results["paired_gains"][f"{a} - {b}"]["t2v_r1"]
        diffs = [x["t2v_r1"] - y["t2v_r1"] for x, y in zip(results["per_seed"][a], results["per_seed"][b], strict=True)]
        assert gain["diffs"] == pytest.approx(diffs)
        assert gain["low"] <= gain["mean"] <= gain["high"]


def test_the_shipped_model_is_the_default_settings_model_and_is_used_without_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mama.demos.pretrain import SHIPPED_DIR, shipped_model

    key = pretrain_key()
    shipped = shipped_model(key)
    # Changing PRETRAIN_CORPUS or PRETRAIN_OVERRIDES changes the key: ship the model they train with it.
    assert shipped == SHIPPED_DIR / f"synthvl-{key}", "no shipped model for the default pretraining settings"
    assert ensure_pretrained(tmp_path / "cache") == shipped
    assert not (tmp_path / "cache").exists()  # nothing generated, nothing trained
    assert "checksums verified" in capsys.readouterr().err
    cfg = load_config(None, [f"model.pretrained={shipped}"])
    module = build_retrieval_module(cfg, create_tokenizer(cfg.model, []))
    saved = load_file(str(shipped / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in module.model.state_dict().items())


def test_a_damaged_shipped_model_is_refused_with_the_file_named(tmp_path: Path) -> None:
    import shutil

    from mama.demos.pretrain import SHIPPED_DIR, ShippedModelError, compare_with_shipped, shipped_model

    key = pretrain_key()
    copy = tmp_path / "shipped"
    shutil.copytree(SHIPPED_DIR / f"synthvl-{key}", copy / f"synthvl-{key}")
    # A byte-identical model trained elsewhere (as `mama demo --train-pretrained` leaves it) compares equal.
    trained = tmp_path / f"model-{key}"
    shutil.copytree(copy / f"synthvl-{key}", trained)
    assert set(compare_with_shipped(trained, copy).values()) == {True}
    for weights in (trained / "model.safetensors", copy / f"synthvl-{key}" / "model.safetensors"):
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
    assert compare_with_shipped(trained, copy) == {
        "config.json": True, "model.safetensors": False, "tokenizer/tokenizer.json": True
    }  # fmt: skip
    with pytest.raises(ShippedModelError, match=r"model\.safetensors: sha256 differs"):
        shipped_model(key, copy)
    weights.unlink()
    with pytest.raises(ShippedModelError, match=r"model\.safetensors: missing"):
        shipped_model(key, copy)
    assert shipped_model("000000000000", copy) is None  # other settings: nothing ships, train it
