"""The CLIP-ViP recipes (configs/*_clip_vip_*.yaml): the authors' settings, and each one trains two steps
and evaluates on the tiny SynthVL with a tiny CLIP-ViP checkpoint in the released layout; the QA task with
``clip_vip`` as its encoder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mama.checkpoint import load_checkpoint
from mama.cli import main
from mama.config import load_config
from tiny_clip_vip import save_released_checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(CONFIGS.glob("*_clip_vip_*.yaml"))
# MSR-VTT with both backbones, DiDeMo, ActivityNet; each with and without MAMA.
EXPECTED = {f"{d}_clip_vip_{b}_{v}.yaml" for d, b in (("msrvtt", "b32"), ("msrvtt", "b16"), ("didemo", "b32"),
            ("activitynet", "b32")) for v in ("mama", "infonce")}  # fmt: skip

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_every_dataset_and_variant_has_a_recipe() -> None:
    assert {p.name for p in RECIPES} == EXPECTED


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_with_the_authors_settings(recipe: Path) -> None:
    cfg = load_config(recipe)
    mama = recipe.name.endswith("_mama.yaml")
    model, optim = cfg.model, cfg.optim
    assert model.name == "clip_vip" and model.pretrained.endswith(".pt")
    backbone = "16" if "_b16_" in recipe.name else "32"
    assert model.clip_config == f"openai/clip-vit-base-patch{backbone}" and backbone in model.pretrained
    assert (model.add_cls_num, model.temporal_size, model.temporal_embed) == (3, 12, True)
    frames, text = (32, 70) if recipe.name.startswith("activitynet") else (12, 50)
    assert cfg.data.num_frames == model.max_frames == frames and model.max_text_length == text
    assert cfg.data.frame_size == model.frame_size == 224
    assert (optim.lr, optim.backbone_lr, optim.weight_decay, optim.beta1, optim.beta2) == (1e-6, None, 0.2, 0.9, 0.98)
    assert (optim.warmup_frac, optim.schedule, optim.grad_clip) == (0.01, "cosine", 1.0)
    assert cfg.loss.init_logit_scale == 4.60 and cfg.loss.max_logit_scale == pytest.approx(math.log(200))
    # With MAMA: adapters, angular margin, meta weighting; without: a plain CLIP-ViP on InfoNCE.
    assert model.adapters == cfg.meta.enabled == (cfg.loss.margin > 0) == mama
    assert cfg.data.meta_holdout > 0  # the same training videos with and without MAMA


@pytest.fixture(scope="module")
def tiny_vip_checkpoint(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIP-ViP as released: 3 proxies, 12 temporal slots, no adapters (the MAMA recipes add theirs)."""
    path = tmp_path_factory.mktemp("clip_vip") / "pretrain_clipvip_tiny.pt"
    return save_released_checkpoint(path, tiny_clip_dir, add_cls_num=3, temporal_size=12)


def _tiny_run(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"data.root={root}", "data.format=jsonl", 'data.videos=""', "data.synthvl=false", "data.train=train.jsonl",
        "data.meta=meta.jsonl", "data.meta_holdout=0", "data.val=val.jsonl", "data.test=test.jsonl",
        "data.num_frames=4", "data.frame_size=32", "data.cached_frames=8", "data.workers=0",
        "model.frame_size=32", "model.max_frames=4", "model.max_text_length=16", "model.adapter_dim=8",
        "train.batch_size=4", "meta.batch_size=4", "train.steps=2", "train.precision=fp32", "train.device=cpu",
        "train.progress=false", "train.log_every=1", "train.checkpoint_every=0", "train.log_weights_every=0",
        "eval.batch_size=64", f"train.out_dir={out}", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_trains_two_steps_and_evaluates(
    recipe: Path, tiny_synthvl: Path, tiny_clip_dir: Path, tiny_vip_checkpoint: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    weights = [f"model.pretrained={tiny_vip_checkpoint}", f"model.clip_config={tiny_clip_dir}"]
    assert main(["train", "--config", str(recipe), *_tiny_run(tiny_synthvl, run, *weights)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"t2v_r1", "v2t_r1", "dsl_t2v_r1"} <= set(metrics)  # the recipes report DSL next to the raw numbers
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [r for r in log if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2] and all(math.isfinite(r["loss"]) for r in losses)
    tensors = load_checkpoint(run / "checkpoints").tensors["task"]
    adapters = [k for k in tensors if ".adaptmlp" in k]
    if recipe.name.endswith("_mama.yaml"):
        assert adapters and "wnet" in load_checkpoint(run / "checkpoints").tensors
        assert any(r.get("meta_loss") is not None for r in losses), "no meta step ran"
    else:
        assert not adapters
    # The proxies of the checkpoint were loaded (and trained from there), not drawn afresh.
    released = torch.load(tiny_vip_checkpoint)["clipmodel.vision_model.embeddings.added_cls"]
    assert (tensors["model.clip.vision_model.embeddings.added_cls"] - released).abs().max() < 1e-3


def test_qa_task_runs_on_clip_vip(tiny_qa_data: Path, tiny_clip_dir: Path, tmp_path: Path) -> None:
    """The MSRVTT-QA recipe with ``model.name=clip_vip``: the fusion reads its proxy and frame tokens."""
    files = [f"qa.{s}=qa_{s}.jsonl" for s in ("train", "meta", "val", "test")]
    overrides = [
        f"data.root={tiny_qa_data}", 'data.videos=""', "qa.format=jsonl", *files, "model.name=clip_vip",
        f"model.pretrained={tiny_clip_dir}", "model.temporal_size=4", "model.adapters=true", "model.adapter_dim=8",
        "data.frame_size=32", "model.frame_size=32", "data.num_frames=4", "model.max_frames=4", "data.workers=0",
        "model.max_text_length=16", "qa.fusion_width=32", "qa.fusion_heads=2", "train.batch_size=8",
        "meta.batch_size=8", "train.steps=2", "train.precision=fp32", "train.device=cpu", "train.progress=false",
        "train.log_every=1", "eval.batch_size=64", f"train.out_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    assert main(["train", "--config", str(CONFIGS / "msrvtt_qa_clip_b32.yaml"), *overrides]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 <= metrics["accuracy"] <= 100
    groups = load_checkpoint(tmp_path / "run" / "checkpoints").state["optimizer"]["param_groups"]
    assert sorted({g["initial_lr"] for g in groups}) == [2e-5, 1e-4]  # backbone at optim.backbone_lr, adapters at lr
