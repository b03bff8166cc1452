"""Training and evaluation engine for contrastive video-text retrieval with optional meta weighting.

``train(cfg)`` reads top to bottom: data, model, optimisers, then one loop in which every step is
forward -> (meta update) -> weighted backward -> optimiser step; logging, validation and checkpoints
run at interval hooks. Run folder layout::

    out_dir/config.yaml           resolved config
    out_dir/log.jsonl             one line per logged step (and per validation)
    out_dir/weights.jsonl         per-sample losses and weights (when train.log_weights_every > 0)
    out_dir/checkpoints/step_*/   safetensors weights + JSON state (atomic, last k kept)
    out_dir/metrics.json          final evaluation on cfg.eval.split
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mama.checkpoint import find_latest_checkpoint, load_checkpoint, save_checkpoint
from mama.config import Config, ConfigError, from_dict, save_config, to_dict
from mama.data.clips import ClipSet, load_clipset
from mama.distributed import is_main_process
from mama.metrics import bucket_recall, metrics_from_ranks, retrieval_ranks
from mama.models import create_model, create_tokenizer, get_spec
from mama.precision import autocast
from mama.task import RetrievalTask
from mama.weighting import MetaWeighting, meta_forward_context

SPLITS = ("train", "meta", "val", "test")


@dataclass
class RunData:
    """Everything a run reads: the tokenizer and the clip sets it needs, by split name."""

    tokenizer: Any
    splits: dict[str, ClipSet]

    @property
    def skipped(self) -> dict[str, int]:
        return {name: len(s.skipped) for name, s in self.splits.items()}


@dataclass
class TrainResult:
    out_dir: Path
    metrics: dict[str, float]  # final evaluation on cfg.eval.split
    wall_s: float  # training wall time (excluding data loading and the final evaluation)
    step_ms: float  # median wall time of a training step
    steps_run: int
    history: list[dict[str, Any]] = field(default_factory=list)


def synthvl_config(seed: int, scale: float = 1.0) -> Any:
    """SynthVL's default settings with every split size multiplied by ``scale``."""
    from mama.data.synthvl import SynthConfig

    base = SynthConfig(seed=seed)
    if scale == 1.0:
        return base
    sizes = {k: max(30, round(getattr(base, k) * scale)) for k in ("num_train", "num_meta", "num_val", "num_test")}
    return dataclasses.replace(base, **sizes)


def ensure_dataset(cfg: Config, progress: bool = True) -> Path:
    """The dataset root; a SynthVL dataset is generated there first when absent or incomplete."""
    root = Path(cfg.data.root)
    if cfg.data.synthvl:
        from mama.data.synthvl import generate, is_complete

        synth_cfg = synthvl_config(cfg.data.synthvl_seed, cfg.data.synthvl_scale)
        if not is_complete(root, synth_cfg):
            generate(root, synth_cfg, progress=progress)
    elif not root.is_dir():
        raise FileNotFoundError(f"data.root {root} does not exist")
    return root


def load_data(cfg: Config, splits: tuple[str, ...] = SPLITS, tokenizer: Any = None, progress: bool = True) -> RunData:
    """Build the tokenizer from the training captions (unless given) and load the requested splits."""
    if cfg.data.frame_size != cfg.model.frame_size:
        raise ConfigError(f"data.frame_size ({cfg.data.frame_size}) != model.frame_size ({cfg.model.frame_size})")
    root = ensure_dataset(cfg, progress)
    files = {"train": cfg.data.train, "meta": cfg.data.meta, "val": cfg.data.val, "test": cfg.data.test}
    from mama.data.records import read_jsonl

    records = {name: read_jsonl(root / files[name]) for name in splits}
    if tokenizer is None:
        if "train" not in records:
            raise ValueError("a tokenizer must be given when the train split is not loaded")
        texts = [c.text for r in records["train"] for c in r.captions if c.source in cfg.data.caption_sources]
        tokenizer = create_tokenizer(cfg.model, texts)
    cached = 2 * cfg.data.num_frames
    loaded = {}
    for name in splits:
        # Only training draws on LVLM captions; meta and evaluation sets stay human-written.
        sources = cfg.data.caption_sources if name == "train" else ("human",)
        loaded[name] = load_clipset(
            root / files[name], tokenizer, cfg.data.frame_size, cached, sources, records[name], progress
        )
    return RunData(tokenizer, loaded)


def resolve_device(name: str) -> torch.device:
    """"auto" picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_task(cfg: Config, tokenizer: Any) -> RetrievalTask:
    torch.manual_seed(cfg.train.seed)
    return RetrievalTask(create_model(cfg.model, tokenizer), cfg.loss)


def lr_lambda(step: int, total: int, warmup_frac: float, schedule: str) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine to 0 (or constant)."""
    warmup = max(1, round(warmup_frac * total)) if warmup_frac > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ConfigError(f"optim.schedule must be 'cosine' or 'constant', got {schedule!r}")
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(cfg: Config, task: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    # No weight decay on gains, biases, embeddings' positions or the logit scale (CLIP practice).
    decay, no_decay = [], []
    for name, p in task.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "pos" in name.split(".")[-1] or "cls" in name else decay).append(p)
    opt = cfg.optim
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opt.lr,
        betas=(opt.beta1, opt.beta2),
    )
    total = cfg.train.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, total, opt.warmup_frac, opt.schedule)
    )
    return optimizer, scheduler


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


@torch.no_grad()
def encode_clipset(task: RetrievalTask, clips: ClipSet, num_frames: int, batch_size: int, precision: str = "fp32") -> tuple[Tensor, Tensor]:
    """All video embeddings (V, D) and all caption embeddings (C, D) of a clip set, in order."""
    task.eval()
    model = task.model
    device = next(task.parameters()).device
    videos, texts = [], []
    with autocast(device, precision):
        for video in clips.eval_video_batches(batch_size, num_frames):
            videos.append(model.encode_video(video.to(device)).float())
        for start in range(0, len(clips.caption_ids), batch_size):
            ids = clips.caption_ids[start : start + batch_size].to(device)
            mask = clips.caption_mask[start : start + batch_size].to(device)
            texts.append(model.encode_text(ids, mask).float())
    return torch.cat(videos), torch.cat(texts)


def evaluate(task: RetrievalTask, clips: ClipSet, cfg: Config) -> dict[str, float]:
    """Retrieval metrics of both directions on a clip set, plus t2v R@1 per concept bucket."""
    video_emb, text_emb = encode_clipset(task, clips, cfg.data.num_frames, cfg.eval.batch_size, cfg.train.precision)
    t2v_ranks, v2t_ranks = retrieval_ranks(text_emb, video_emb, clips.caption_video, chunk_size=cfg.eval.chunk_size)
    metrics = metrics_from_ranks(t2v_ranks, v2t_ranks)
    buckets = [clips.records[v].meta.get("bucket") for v in clips.caption_video.tolist()]
    if all(b is not None for b in buckets):
        for bucket, value in bucket_recall(t2v_ranks, buckets, k=1).items():
            metrics[f"{bucket}_t2v_r1"] = value
    metrics["num_videos"] = float(len(clips))
    metrics["num_queries"] = float(len(text_emb))
    return metrics


class JsonlLog:
    """Append-only JSON-lines log that, on resume, drops lines from after the checkpoint's step."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if self._step_of(line) <= resume_step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)
        elif path.exists():
            path.unlink()

    @staticmethod
    def _step_of(line: str) -> float:
        # A line cut short by a crash mid-write is dropped, not a reason to refuse to resume.
        try:
            return json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            return math.inf

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def _per_group_mean(values: Tensor, groups: list[str]) -> dict[str, float]:
    out = {}
    for name in sorted(set(groups)):
        mask = torch.tensor([g == name for g in groups])
        out[name] = float(values[mask].mean())
    return out


def save_run_checkpoint(
    out_dir: Path,
    step: int,
    cfg: Config,
    task: RetrievalTask,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    meta: MetaWeighting | None,
) -> Path:
    tensors = {"task": task.state_dict()}
    state: dict[str, Any] = {
        "step": step,
        "config": to_dict(cfg),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "tokenizer_dir": "tokenizer",
    }
    if meta is not None:
        tensors["wnet"] = meta.wnet.state_dict()
        state["meta_optimizer"] = meta.optimizer.state_dict()
    return save_checkpoint(out_dir / "checkpoints", step, tensors, state, keep_last=cfg.train.keep_last)


def _check_resumable(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume with a config that changes what is being trained (logging may differ)."""
    free = {("train", k) for k in ("progress", "overwrite", "log_every", "eval_every", "checkpoint_every", "keep_last", "log_weights_every", "threads", "out_dir")}
    changed = [
        f"{section}.{key}: {saved[section][key]!r} -> {value!r}"
        for section, values in current.items()
        for key, value in values.items()
        if (section, key) not in free and saved.get(section, {}).get(key) != value
    ]
    if changed:
        raise ConfigError(f"cannot resume from {path}: the config changed ({'; '.join(changed)})")


def train(cfg: Config, data: RunData | None = None, resume: bool = False, max_steps: int | None = None) -> TrainResult:
    """Train ``cfg``; with ``resume`` continue from the newest valid checkpoint in ``cfg.train.out_dir``.

    ``max_steps`` stops the run early after that many steps (with a checkpoint), as a crash would;
    the schedule still follows ``cfg.train.steps``.
    """
    tc = cfg.train
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    out_dir = Path(tc.out_dir)
    checkpoint_dir = out_dir / "checkpoints"
    if not resume and not tc.overwrite and any(checkpoint_dir.glob("step_*")):
        raise ConfigError(
            f"{out_dir} already holds a run; resume it (--resume), choose another train.out_dir, "
            "or set train.overwrite=true to replace it"
        )
    if not resume and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    data = data or load_data(cfg, ("train", "meta", "val", "test") if cfg.meta.enabled else ("train", "val", "test"), progress=tc.progress)
    data.tokenizer.save(out_dir / "tokenizer")
    train_set = data.splits["train"]

    device = resolve_device(tc.device)
    task = build_task(cfg, data.tokenizer).to(device)
    optimizer, scheduler = build_optimizer(cfg, task)
    meta = MetaWeighting(cfg.meta, task) if cfg.meta.enabled else None
    if meta is not None:
        meta.wnet.to(device)
    meta_set = data.splits.get("meta") if meta is not None else None
    if meta is not None and meta_set is None:
        raise ValueError("meta.enabled needs the meta split loaded")

    start_step = 0
    if resume:
        latest = find_latest_checkpoint(checkpoint_dir)
        if latest is not None:
            ckpt = load_checkpoint(latest)
            _check_resumable(ckpt.state["config"], to_dict(cfg), latest)
            task.load_state_dict(ckpt.tensors["task"])
            optimizer.load_state_dict(ckpt.state["optimizer"])
            scheduler.load_state_dict(ckpt.state["scheduler"])
            if meta is not None:
                meta.wnet.load_state_dict(ckpt.tensors["wnet"])
                meta.optimizer.load_state_dict(ckpt.state["meta_optimizer"])
            _set_rng_state(ckpt.state["rng"])
            start_step = ckpt.step
    log = JsonlLog(out_dir / "log.jsonl", start_step if resume else None)
    weight_log = JsonlLog(out_dir / "weights.jsonl", start_step if resume else None) if tc.log_weights_every else None

    end_step = tc.steps if max_steps is None else min(tc.steps, start_step + max_steps)
    step_times: list[float] = []
    history: list[dict[str, Any]] = []
    window: list[float] = []
    t_start = time.perf_counter()
    bar = tqdm(range(start_step, end_step), desc=Path(tc.out_dir).name, unit="step", disable=not tc.progress, initial=start_step, total=tc.steps)
    for step in bar:
        t0 = time.perf_counter()
        task.train()
        batch = train_set.train_batch(step, tc.batch_size, cfg.data.num_frames, tc.seed)
        meta_now = meta is not None and meta.is_meta_step(step)
        batch = {k: v.to(device) for k, v in batch.items()}
        with meta_forward_context(meta_now), autocast(device, tc.precision):
            out = task(batch)
            loss_per_sample = out["loss_per_sample"]
            if meta is not None:
                meta_batch = None
                if meta_now:
                    meta_batch = meta_set.random_batch(step, cfg.meta.batch_size, cfg.data.num_frames, tc.seed)
                    meta_batch = {k: v.to(device) for k, v in meta_batch.items()}
                result = meta.step(task, loss_per_sample, meta_batch, step)
                weights, meta_loss = result.weights, result.meta_loss
            else:
                weights, meta_loss = torch.full_like(loss_per_sample, 1.0 / len(loss_per_sample)), None
        loss = (weights.detach() * loss_per_sample).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(task.parameters(), tc_clip) if (tc_clip := cfg.optim.grad_clip) > 0 else None
        optimizer.step()
        scheduler.step()
        task.logit_scale.clamp_()
        step_times.append(time.perf_counter() - t0)
        window.append(float(loss_per_sample.detach().mean()))

        done = step + 1
        sources = [train_set.caption_source[i] for i in batch["caption_index"].tolist()]
        noises = [train_set.caption_noise[i] for i in batch["caption_index"].tolist()]
        if done % tc.log_every == 0 or done == end_step:
            record = {
                "step": done,
                "loss": statistics.fmean(window),
                "lr": scheduler.get_last_lr()[0],
                "logit_scale": float(task.logit_scale().detach()),
                "step_ms": 1000 * statistics.median(step_times[-tc.log_every :]),
            }
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            if meta is not None:
                record["meta_loss"] = meta_loss
                scaled = weights * len(weights)  # 1.0 = the uniform weight
                record["weight_by_source"] = _per_group_mean(scaled, sources)
                record["weight_by_noise"] = _per_group_mean(scaled, noises)
            window = []
            history.append(record)
            if is_main_process():
                log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
        if weight_log is not None and done % tc.log_weights_every == 0 and is_main_process():
            weight_log.write(
                {
                    "step": done,
                    "video_id": [train_set.records[i].id for i in batch["video_index"].tolist()],
                    "source": sources,
                    "noise": noises,
                    "loss": [round(v, 5) for v in loss_per_sample.detach().tolist()],
                    "weight": [round(v, 6) for v in weights.tolist()],
                }
            )
        if tc.eval_every and done % tc.eval_every == 0 and done != tc.steps:
            val = evaluate(task, data.splits["val"], cfg)
            log.write({"step": done, "split": "val", **val})
        if is_main_process() and (done == end_step or (tc.checkpoint_every and done % tc.checkpoint_every == 0)):
            save_run_checkpoint(out_dir, done, cfg, task, optimizer, scheduler, meta)
    bar.close()
    wall_s = time.perf_counter() - t_start

    metrics: dict[str, float] = {}
    if end_step == tc.steps and (step_times or not (out_dir / "metrics.json").exists()):
        metrics = evaluate(task, data.splits[cfg.eval.split], cfg)
        summary = {
            "split": cfg.eval.split,
            "steps": tc.steps,
            "wall_s": wall_s,
            "step_ms": 1000 * statistics.median(step_times) if step_times else float("nan"),
            "skipped_videos": data.skipped,
            **metrics,
        }
        if is_main_process():
            tmp = out_dir / "metrics.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2))
            tmp.replace(out_dir / "metrics.json")
    return TrainResult(
        out_dir=out_dir,
        metrics=metrics,
        wall_s=wall_s,
        step_ms=1000 * statistics.median(step_times) if step_times else float("nan"),
        steps_run=end_step - start_step,
        history=history,
    )


def load_trained(path: Path) -> tuple[Config, RetrievalTask, Any, MetaWeighting | None]:
    """Load a run folder or checkpoint folder: config, task with weights, tokenizer, weighting net."""
    path = Path(path)
    ckpt_path = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    ckpt = load_checkpoint(ckpt_path)
    cfg = from_dict(Config, ckpt.state["config"])
    run_dir = ckpt.path.parent.parent
    tokenizer = get_spec(cfg.model.name).load_tokenizer(cfg.model, run_dir / ckpt.state["tokenizer_dir"])
    task = RetrievalTask(create_model(cfg.model, tokenizer), cfg.loss)
    task.load_state_dict(ckpt.tensors["task"])
    task.eval()
    meta = None
    if "wnet" in ckpt.tensors:
        meta = MetaWeighting(cfg.meta, task)
        meta.wnet.load_state_dict(ckpt.tensors["wnet"])
    return cfg, task, tokenizer, meta


def evaluate_checkpoint(path: Path, split: str | None = None, progress: bool = True) -> dict[str, float]:
    """Evaluate a trained run (or one checkpoint) on ``split`` (default: its config's eval split)."""
    cfg, task, tokenizer, _ = load_trained(path)
    split = split or cfg.eval.split
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    data = load_data(cfg, (split,), tokenizer=tokenizer, progress=progress)
    return evaluate(task, data.splits[split], cfg)
