"""Multi-process training with gloo on CPU: 2 ranks must compute what 1 process computes on the global batch.

Every test here launches ``torchrun --nproc_per_node 2`` (about 5 s of start-up each), the same way a
user launches training. Ranks run one thread each: two busy processes on two cores otherwise collapse.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from mama.checkpoint import load_checkpoint
from mama.config import LossConfig, MetaConfig, ModelConfig, load_config
from mama.distributed import all_reduce_sum_, gather_rows
from mama.models import create_model
from mama.tasks.retrieval.module import RetrievalModule
from mama.tokenizer import WordTokenizer
from mama.weighting import MetaWeighting, meta_forward_context

pytestmark = pytest.mark.distributed

Overrides = Callable[[str | Path, str | Path], list[str]]
GLOBAL_BATCH = 8
WORDS = ["a", "the", "red", "green", "blue", "circle", "square", "moves", "left", "right", "up", "down"]
# Adam divides by the root of tiny second moments, which turns 1e-8 summation-order differences into
# lr-sized ones; eps = 1 keeps AdamW well conditioned so 2-rank and 1-rank runs stay within 1e-5.
STABLE = ["optim.eps=1.0", "optim.lr=0.05", "meta.optimizer=sgd", "train.threads=1"]
RECIPE = str(Path(__file__).parents[1] / "configs" / "synthvl_mama.yaml")  # the demo's MAMA recipe
# A weighting net that moves (random init, a large SGD step, a meta step every step), so that its
# weights, and through them the model's update, depend on the meta-gradient: with the defaults it
# stays within ~1e-6 of flat over 6 steps, which no 1e-5 comparison could tell from a wrong one.
ACTIVE_META = ["meta.enabled=true", "meta.zero_init=false", "meta.lr=1.0", "meta.interval=1"]


def build_case() -> tuple[RetrievalModule, MetaConfig, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A float64 tiny task, a meta config with the virtual step over *all* parameters (so the
    second-order graph crosses the all-gathers of the trunk), and fixed train and meta batches."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        width=16,
        heads=2,
        embed_dim=8,
        video_layers=1,
        text_layers=1,
        stem_channels=2,
        frame_size=16,
        max_frames=4,
        max_text_length=8,
    )
    tokenizer = WordTokenizer.build(WORDS, max_length=cfg.max_text_length)
    task = RetrievalModule(create_model(cfg, tokenizer), LossConfig(margin=0.05)).double()
    g = torch.Generator().manual_seed(1)

    def batch(n: int) -> dict[str, torch.Tensor]:
        picks = torch.randint(len(WORDS), (n, 5), generator=g)
        ids, mask = tokenizer([" ".join(WORDS[i] for i in row) for row in picks.tolist()])
        return {
            "video": torch.randn(n, 3, 3, 16, 16, generator=g, dtype=torch.float64),
            "input_ids": ids,
            "attention_mask": mask,
        }

    meta_cfg = MetaConfig(
        interval=1, enabled=True, hidden=8, zero_init=False, optimizer="sgd", lr=0.5, virtual_lr=0.5, virtual_params=[]
    )
    return task, meta_cfg, batch(GLOBAL_BATCH), batch(6)


def _torchrun(args: list[str], tmp_path: Path, expect_ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    teardown_abort = "terminate called without an active exception" in done.stderr and '"out_dir"' in done.stdout
    if expect_ok and teardown_abort:
        # Rarely (about 1 launch in 30 here) a gloo rank aborts while the interpreter exits, after the
        # job is complete: rank 0 printed its final metrics, which needs every rank's last collective.
        # The results the test checks are all written; this is not a failure of the code under test.
        done.returncode = 0
    if expect_ok:
        assert done.returncode == 0, (
            f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        )
    return done


def compute_case(
    task: RetrievalModule, meta_cfg: MetaConfig, train: dict[str, Any], meta_batch: dict[str, Any], world: int
) -> dict[str, torch.Tensor]:
    """What the comparison looks at, computed from this process's rows (all rows when ``world`` is 1):
    the gradient of the global mean loss, the per-sample losses, and the result of one exact and one
    first-order meta step (meta loss, weights, updated weighting net), gathered in rank order."""
    out: dict[str, torch.Tensor] = {}
    losses = task(train)["loss_per_sample"]
    # Each rank's share of the global mean, times world: DDP averages gradients over ranks.
    (world * losses.sum() / GLOBAL_BATCH).backward()
    grads = [p.grad for p in task.parameters()]
    all_reduce_sum_(grads)
    for (name, _), g in zip(task.named_parameters(), grads, strict=True):
        out[f"grad.{name}"] = g / world
    out["loss_per_sample"] = gather_rows(losses.detach())
    task.zero_grad(set_to_none=True)
    for method in ("exact", "first_order"):
        cfg = copy.copy(meta_cfg)
        cfg.method = method
        torch.manual_seed(1)
        meta = MetaWeighting(cfg, task)
        meta.wnet.double()
        with meta_forward_context(True):
            losses = task(train)["loss_per_sample"]
            result = meta.step(
                task,
                losses,
                meta_batch,
                0,
                train_forward=lambda params: torch.func.functional_call(task, params, (train,))["loss_per_sample"],
            )
        out[f"{method}.meta_loss"] = torch.tensor(result.meta_loss, dtype=torch.float64)
        out[f"{method}.weights"] = gather_rows(result.weights)
        for name, p in meta.wnet.named_parameters():
            out[f"{method}.wnet.{name}"] = p.detach().clone()
    return out


def test_gathered_loss_and_meta_step_equal_single_process(tmp_path: Path) -> None:
    worker = Path(__file__).with_name("distributed_worker.py")
    _torchrun([str(worker), str(tmp_path / "ranks.pt")], tmp_path)
    got = torch.load(tmp_path / "ranks.pt")
    ref = compute_case(*build_case(), world=1)
    assert torch.equal(got.pop("gather_rows").flatten(), torch.arange(5, dtype=torch.float64))
    assert set(got) == set(ref)
    for key, value in ref.items():
        # float64 throughout: only summation order differs between 1 and 2 processes.
        torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-11, msg=lambda m, k=key: f"{k}: {m}")
    # The meta step really moved the weighting net (the comparison is not between two no-ops).
    torch.manual_seed(1)
    fresh = MetaWeighting(build_case()[1], build_case()[0]).wnet.double()
    moved = max((ref[f"exact.wnet.{n}"] - p).abs().max().item() for n, p in fresh.named_parameters())
    assert moved > 1e-4


def assert_weighting_net_moved(run_dir: Path, at_least: float = 1e-2) -> None:
    """The weighting net changed between the step-3 and step-6 checkpoints by far more than the
    1e-5 tolerance of the comparisons, so those compare a meta-gradient, not a flat net."""
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    early, late = load_checkpoint(ckpts[0]).tensors["wnet"], load_checkpoint(ckpts[-1]).tensors["wnet"]
    moved = max((early[k] - late[k]).abs().max().item() for k in early)
    assert moved > at_least, f"the weighting net moved only {moved:.1e}"


def _final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(run_dir / "checkpoints")
    return {f"{group}.{k}": v for group, tensors in ckpt.tensors.items() for k, v in tensors.items()}


def _assert_close_runs(a: Path, b: Path, atol: float) -> None:
    ta, tb = _final_tensors(a), _final_tensors(b)
    assert set(ta) == set(tb)
    worst = max((ta[k].double() - tb[k].double()).abs().max().item() for k in ta)
    assert worst <= atol, f"{a.name} vs {b.name}: max |diff| {worst:.2e} > {atol:.0e}"


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(["meta.enabled=false"], id="plain"),
        pytest.param(ACTIVE_META, id="meta"),
        # The first-order probe divides a loss difference by a 1e-2 step: summation-order noise is
        # amplified ~100x, so this variant is compared at 1e-4 (the weighting net moves by > 1e-2).
        pytest.param([*ACTIVE_META, "meta.method=first_order"], id="meta-first-order"),
        pytest.param([*ACTIVE_META, "train.accum_steps=2"], id="meta+accumulation"),
    ],
)
def test_two_process_training_equals_one_process(
    variant: list[str], tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path: Path
) -> None:
    from mama.tasks import train

    common = [*STABLE, *variant, "train.checkpoint_every=3"]
    result = train(load_config(RECIPE, [*tiny_overrides(tiny_synthvl, tmp_path / "one"), *common]))
    two_dir = tmp_path / "two"
    _torchrun(
        ["-m", "mama.cli", "train", "--config", RECIPE, *tiny_overrides(tiny_synthvl, two_dir), *common], tmp_path
    )
    _assert_close_runs(tmp_path / "one", two_dir, atol=1e-4 if "meta.method=first_order" in variant else 1e-5)
    if "meta.enabled=true" in variant:
        assert_weighting_net_moved(tmp_path / "one")
    # Evaluation with sharded encoding gives the same metrics, and only rank 0 wrote the run folder.
    import json

    two_metrics = json.loads((two_dir / "metrics.json").read_text())
    assert two_metrics["world_size"] == 2
    assert two_metrics["num_videos"] == result.metrics["num_videos"]
    assert two_metrics["num_queries"] == result.metrics["num_queries"]
    one_query = 100 / result.metrics["num_queries"]  # parameters equal to 1e-5 may still flip a near-tie
    for key in ("t2v_r1", "t2v_r5", "v2t_r1", "t2v_mnr"):
        assert two_metrics[key] == pytest.approx(result.metrics[key], abs=one_query + 1e-6), key
    assert len((two_dir / "log.jsonl").read_text().splitlines()) == len(
        (tmp_path / "one" / "log.jsonl").read_text().splitlines()
    )


def test_two_process_run_resumes_on_one_process(tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path: Path) -> None:
    """A checkpoint from 2 ranks resumes on 1 (the global batch is what matters) and ends where an
    uninterrupted single-process run ends."""
    from mama.tasks import train

    common = [*STABLE, *ACTIVE_META, "train.checkpoint_every=2", "train.keep_last=5"]
    train(load_config(RECIPE, [*tiny_overrides(tiny_synthvl, tmp_path / "one"), *common]))
    two_dir = tmp_path / "two"
    _torchrun(
        ["-m", "mama.cli", "train", "--config", RECIPE, *tiny_overrides(tiny_synthvl, two_dir), *common], tmp_path
    )
    # Keep only the step-2 checkpoint of the 2-rank run, then finish on one process.
    import shutil

    for ckpt in (two_dir / "checkpoints").glob("step_*"):
        if ckpt.name != "step_00000002":
            shutil.rmtree(ckpt)
    assert [p.name for p in (two_dir / "checkpoints").glob("step_*")] == ["step_00000002"]
    # "latest" still names the deleted step-6 checkpoint: the resume says so and falls back to step 2.
    with pytest.warns(UserWarning, match="names missing checkpoint"):
        train(load_config(RECIPE, [*tiny_overrides(tiny_synthvl, two_dir), *common]), resume=True)
    _assert_close_runs(tmp_path / "one", two_dir, atol=1e-5)


def test_meta_batch_larger_than_the_meta_split_is_refused_on_several_ranks(
    tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path: Path
) -> None:
    """One rank would get every meta video and the other none (a hang in the all-gather): refuse."""
    done = _torchrun(
        [
            "-m",
            "mama.cli",
            "train",
            "--config",
            RECIPE,
            *tiny_overrides(tiny_synthvl, tmp_path / "run"),
            "meta.batch_size=64",
        ],
        tmp_path,
        expect_ok=False,
    )
    assert done.returncode != 0
    assert "meta.batch_size (64) exceeds the 30 meta videos" in done.stderr
