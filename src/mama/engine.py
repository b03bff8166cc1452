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
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from mama.checkpoint import find_latest_checkpoint, load_checkpoint, save_checkpoint
from mama.config import Config, ConfigError, from_dict, save_config, to_dict
from mama.data.clips import ClipSet, load_clipset, map_in_workers
from mama.data.records import VideoRecord, add_lvlm_captions, read_lvlm_captions
from mama.distributed import (
    DistContext,
    all_gather_object,
    barrier,
    broadcast_object,
    cleanup,
    gather_rows,
    init_distributed,
    shard_range,
)
from mama.metrics import bucket_recall, dsl_metrics, metrics_from_ranks, retrieval_ranks
from mama.models import create_model, create_tokenizer, get_spec
from mama.precision import autocast, grad_scaler
from mama.task import RetrievalTask, encode_for_cache
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
    step_ms: float  # mean wall time of a training step (a mean: with meta.interval > 1 steps alternate in cost)
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


def read_records(cfg: Config, root: Path, splits: tuple[str, ...]) -> dict[str, list[VideoRecord]]:
    """The records of each split in ``splits``, read with the ``data.format`` reader.

    With ``data.meta == ""`` and ``data.meta_holdout > 0`` the meta split is held out of the training
    split (balanced over caption-topic clusters), and the training split loses those videos whether or
    not this run uses meta weighting, so that runs with and without it train on the same videos. LVLM
    captions from ``data.lvlm_captions`` join the training pools.
    """
    from mama.data.datasets import read_dataset
    from mama.data.meta_split import hold_out_balanced

    dc = cfg.data
    files = {"train": dc.train, "meta": dc.meta, "val": dc.val, "test": dc.test}
    holdout = not dc.meta and dc.meta_holdout > 0
    if "meta" in splits and not dc.meta and not holdout:
        raise ConfigError("the meta split needs data.meta (an annotation file) or data.meta_holdout > 0")
    videos = Path(dc.videos) if dc.videos else None
    wanted = set(splits) | ({"train"} if holdout and "meta" in splits else set())
    records = {
        name: read_dataset(dc.format, root / files[name], videos)
        for name in SPLITS
        if name in wanted and not (name == "meta" and holdout)
    }
    if dc.lvlm_captions and "train" in records:
        for path in dc.lvlm_captions:
            added, unknown = add_lvlm_captions(records["train"], read_lvlm_captions(path))
            if unknown:
                warnings.warn(
                    f"{path}: {len(unknown)} video id(s) match no training video (e.g. {unknown[:3]}); their captions are not used",
                    stacklevel=2,
                )
            if not added:
                warnings.warn(f"{path}: no LVLM caption matched a training video", stacklevel=2)
    if holdout and "train" in records:
        # A fixed seed, not train.seed: every run on this data (any seed, any variant) holds out the same videos.
        records["train"], meta = hold_out_balanced(records["train"], dc.meta_holdout, seed=0)
        if "meta" in splits:
            records["meta"] = meta
    return {name: records[name] for name in splits}


def load_data(cfg: Config, splits: tuple[str, ...] = SPLITS, tokenizer: Any = None, progress: bool = True) -> RunData:
    """Build the tokenizer from the training captions (unless given) and load the requested splits."""
    if cfg.data.frame_size != cfg.model.frame_size:
        raise ConfigError(f"data.frame_size ({cfg.data.frame_size}) != model.frame_size ({cfg.model.frame_size})")
    root = ensure_dataset(cfg, progress)
    files = {"train": cfg.data.train, "meta": cfg.data.meta or cfg.data.train, "val": cfg.data.val, "test": cfg.data.test}
    records = read_records(cfg, root, splits)
    if tokenizer is None:
        if "train" not in records:
            raise ValueError("a tokenizer must be given when the train split is not loaded")
        texts = [c.text for r in records["train"] for c in r.captions if c.source in cfg.data.caption_sources]
        tokenizer = create_tokenizer(cfg.model, texts)
    spec = get_spec(cfg.model.name)
    slots = cfg.data.cached_frames or 2 * cfg.data.num_frames
    loaded = {}
    for name in splits:
        # Only training draws on LVLM captions; meta and evaluation sets stay human-written.
        sources = cfg.data.caption_sources if name == "train" else ("human",)
        loaded[name] = load_clipset(
            name, records[name], tokenizer, cfg.data.frame_size, slots, sources,
            decode=cfg.data.decode, cache_dir=root / ".cache", annotation=root / files[name],
            pixel_mean=spec.pixel_mean, pixel_std=spec.pixel_std, progress=progress,
        )
    return RunData(tokenizer, loaded)


def build_task(cfg: Config, tokenizer: Any, pretrained: bool = True) -> RetrievalTask:
    """The task with a freshly built model; ``pretrained`` loads the backbone's pretrained weights
    (when the model has any), which a resumed or loaded run skips: its weights come from a checkpoint."""
    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model, tokenizer)
    load_weights = get_spec(cfg.model.name).load_weights
    if pretrained and load_weights is not None:
        load_weights(model, cfg.model)
    return RetrievalTask(model, cfg.loss)


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


def build_optimizer(cfg: Config, task: RetrievalTask) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with weight decay on matrices only, the pretrained backbone at ``optim.backbone_lr``, and
    the warm-up + cosine schedule applied to every group."""
    opt = cfg.optim
    backbone = tuple(f"model.{prefix}" for prefix in getattr(task.model, "backbone_prefixes", ()))
    backbone_lr = opt.lr if opt.backbone_lr is None else opt.backbone_lr
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in task.named_parameters():
        if not p.requires_grad:
            continue
        # No weight decay on gains, biases, embeddings' positions or the logit scale (CLIP practice).
        no_decay = p.ndim < 2 or "pos" in name.split(".")[-1] or "cls" in name
        groups.setdefault((name.startswith(backbone) if backbone else False, no_decay), []).append(p)
    optimizer = torch.optim.AdamW(
        [
            {"params": params, "weight_decay": 0.0 if no_decay else opt.weight_decay, "lr": backbone_lr if is_backbone else opt.lr}
            for (is_backbone, no_decay), params in sorted(groups.items())
        ],
        lr=opt.lr,
        betas=(opt.beta1, opt.beta2),
        eps=opt.eps,
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
def encode_clipset(
    task: RetrievalTask, clips: ClipSet, num_frames: int, batch_size: int, precision: str = "fp32", workers: int = 0
) -> tuple[Tensor, Tensor]:
    """All video embeddings (V, D) and all caption embeddings (C, D) of a clip set, in order.

    With several processes each rank encodes a contiguous share and the shares are gathered, so every
    item is encoded once and none is duplicated by padding.
    """
    task.eval()
    model = task.model
    device = next(task.parameters()).device
    video_share = shard_range(len(clips))
    caption_share = shard_range(len(clips.caption_ids))
    videos, texts = [], []
    with autocast(device, precision):
        for video in clips.eval_video_batches(batch_size, num_frames, video_share, workers):
            videos.append(model.encode_video(video.to(device)).float())
        for start in range(caption_share.start, caption_share.stop, batch_size):
            stop = min(start + batch_size, caption_share.stop)
            ids = clips.caption_ids[start:stop].to(device)
            mask = clips.caption_mask[start:stop].to(device)
            texts.append(model.encode_text(ids, mask).float())
    if not videos or not texts:  # a rank with an empty share still joins the gather, with 0 rows
        dim = model.encode_text(clips.caption_ids[:1].to(device), clips.caption_mask[:1].to(device)).shape[1]
        videos, texts = videos or [torch.zeros(0, dim, device=device)], texts or [torch.zeros(0, dim, device=device)]
    return gather_rows(torch.cat(videos)), gather_rows(torch.cat(texts))


def evaluate(task: RetrievalTask, clips: ClipSet, cfg: Config) -> dict[str, float]:
    """Retrieval metrics of both directions on a clip set, plus t2v R@1 per concept bucket."""
    video_emb, text_emb = encode_clipset(task, clips, cfg.data.num_frames, cfg.eval.batch_size, cfg.train.precision, cfg.data.workers)
    t2v_ranks, v2t_ranks = retrieval_ranks(text_emb, video_emb, clips.caption_video, chunk_size=cfg.eval.chunk_size)
    metrics = metrics_from_ranks(t2v_ranks, v2t_ranks)
    if cfg.eval.dsl:
        # Labelled dsl_*: re-normalised with statistics of the whole query set (see EvalConfig.dsl).
        metrics.update(dsl_metrics(text_emb, video_emb, clips.caption_video, chunk_size=cfg.eval.chunk_size))
    buckets = [clips.records[v].meta.get("bucket") for v in clips.caption_video.tolist()]
    if all(b is not None for b in buckets):
        for bucket, value in bucket_recall(t2v_ranks, buckets, k=1).items():
            metrics[f"{bucket}_t2v_r1"] = value
    metrics["num_videos"] = float(len(clips))
    metrics["num_queries"] = float(len(text_emb))
    return metrics


class JsonlLog:
    """Append-only JSON-lines log that, on resume, drops lines from after the checkpoint's step."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True):
        self.path = path
        self.enabled = enabled  # only rank 0 writes
        if not enabled:
            return
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
        if not self.enabled:
            return
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
    scaler: torch.amp.GradScaler | None = None,
    world: int = 1,
) -> Path:
    """Everything a bitwise resume needs: weights, optimiser, scheduler, gradient scaler, weighting net
    and its optimiser, RNG states, and the step (which is also the sampler's position)."""
    tensors = {"task": task.state_dict()}
    state: dict[str, Any] = {
        "step": step,
        "world_size": world,
        "config": to_dict(cfg),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "tokenizer_dir": "tokenizer",
    }
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    if meta is not None:
        tensors["wnet"] = meta.wnet.state_dict()
        state["meta_optimizer"] = meta.optimizer.state_dict()
    return save_checkpoint(out_dir / "checkpoints", step, tensors, state, keep_last=cfg.train.keep_last)


def _check_resumable(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume with a config that changes what is being trained (logging may differ).

    The number of processes and micro-batches may change: the global batch, and so every update,
    stays the same (up to floating-point summation order).
    """
    free = {("train", k) for k in ("progress", "overwrite", "log_every", "eval_every", "checkpoint_every", "keep_last", "log_weights_every", "threads", "out_dir", "accum_steps", "device")}
    free |= {("data", "workers"), ("eval", "dsl"), ("eval", "batch_size"), ("eval", "chunk_size")}
    # Keys added to the config after the checkpoint was written take their defaults, which reproduce
    # the behaviour of the version that wrote it.
    saved = to_dict(from_dict(Config, saved))
    changed = [
        f"{section}.{key}: {saved[section][key]!r} -> {value!r}"
        for section, values in current.items()
        if isinstance(values, dict)
        for key, value in values.items()
        if (section, key) not in free and saved[section][key] != value
    ]
    changed += [f"{key}: {saved[key]!r} -> {value!r}" for key, value in current.items() if not isinstance(value, dict) and saved[key] != value]
    if changed:
        raise ConfigError(f"cannot resume from {path}: the config changed ({'; '.join(changed)})")


def _split_batch(batch: dict[str, Tensor], parts: int) -> list[dict[str, Tensor]]:
    """(n, ...) tensors -> ``parts`` micro-batches of n / parts rows, in order."""
    return [dict(zip(batch, values, strict=True)) for values in zip(*(v.chunk(parts) for v in batch.values()), strict=True)]


def _check_batch_sizes(cfg: Config, world: int) -> None:
    tc = cfg.train
    if tc.accum_steps < 1:
        raise ConfigError(f"train.accum_steps must be >= 1, got {tc.accum_steps}")
    if tc.batch_size % (world * tc.accum_steps):
        raise ConfigError(
            f"train.batch_size ({tc.batch_size}) must be divisible by world size x train.accum_steps "
            f"({world} x {tc.accum_steps}): every rank and micro-batch holds the same number of rows"
        )
    if cfg.meta.enabled and cfg.meta.batch_size % world:
        raise ConfigError(f"meta.batch_size ({cfg.meta.batch_size}) must be divisible by the world size ({world})")


def _merge_failures(data: RunData) -> dict[str, int]:
    """Share the mid-run decode failures of every rank (collective: all ranks call it at the same
    step) and return the skipped-video count of each split."""
    per_rank = all_gather_object({name: dict(split.failed) for name, split in data.splits.items()})
    for failures in per_rank:
        assert isinstance(failures, dict)
        for name, split in data.splits.items():
            split.note_failures(failures[name])
    return data.skipped


@dataclass
class _StepBatches:
    """``step -> (training batch, meta batch or None)`` of this rank: a pure function of the step, so
    data-loading workers can build batches ahead of the loop without changing them."""

    train_set: ClipSet
    meta_set: ClipSet | None
    cfg: Config
    rows: range
    meta_rows: range

    def __call__(self, step: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
        cfg = self.cfg
        batch = self.train_set.train_batch(step, cfg.train.batch_size, cfg.data.num_frames, cfg.train.seed, self.rows)
        meta_batch = None
        if self.meta_set is not None and cfg.meta.enabled and step % cfg.meta.interval == 0:
            meta_batch = self.meta_set.random_batch(step, cfg.meta.batch_size, cfg.data.num_frames, cfg.train.seed, self.meta_rows)
        return batch, meta_batch


def train(cfg: Config, data: RunData | None = None, resume: bool = False, max_steps: int | None = None) -> TrainResult:
    """Train ``cfg``; with ``resume`` continue from the newest valid checkpoint in ``cfg.train.out_dir``.

    Launched by ``torchrun`` the same call trains with every process (see docs/distributed.md): each
    rank takes its rows of the global batch, negatives span all ranks, and only rank 0 writes.
    ``max_steps`` stops the run early after that many steps (with a checkpoint), as a crash would;
    the schedule still follows ``cfg.train.steps``.
    """
    ctx = init_distributed(cfg.train.device)
    failed = True
    try:
        result = _train(cfg, ctx, data, resume, max_steps)
        failed = False
        return result
    finally:
        cleanup(ctx, failed)


def _train(cfg: Config, ctx: DistContext, data: RunData | None, resume: bool, max_steps: int | None) -> TrainResult:
    tc = cfg.train
    world, main = ctx.world_size, ctx.rank == 0
    _check_batch_sizes(cfg, world)
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    out_dir = Path(tc.out_dir)
    checkpoint_dir = out_dir / "checkpoints"
    # Rank 0 looks at the run folder and tells the others, so that every rank takes the same branch.
    occupied = broadcast_object(any(checkpoint_dir.glob("step_*")) if main else None)
    if not resume and not tc.overwrite and occupied:
        raise ConfigError(
            f"{out_dir} already holds a run; resume it (--resume), choose another train.out_dir, "
            "or set train.overwrite=true to replace it"
        )
    barrier()  # every rank has looked at out_dir before rank 0 changes it
    if main:
        if not resume and checkpoint_dir.exists():
            shutil.rmtree(checkpoint_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    splits = ("train", "meta", "val", "test") if cfg.meta.enabled else ("train", "val", "test")
    if data is None:
        # Rank 0 generates the dataset and fills the frame cache; the others then read the cache.
        if main:
            data = load_data(cfg, splits, progress=tc.progress)
        barrier()
        if not main:
            data = load_data(cfg, splits, progress=False)
    assert data is not None
    if main:
        data.tokenizer.save(out_dir / "tokenizer")
    train_set = data.splits["train"]

    device = ctx.device
    latest = broadcast_object(find_latest_checkpoint(checkpoint_dir) if main and resume else None)
    task = build_task(cfg, data.tokenizer, pretrained=latest is None).to(device)
    # The real update goes through DDP (gradient all-reduce overlapped with backward). The exact meta
    # step differentiates that same training forward with torch.autograd.grad to explicit inputs,
    # which does not fire DDP's reduction hooks; its meta-batch forward, the first-order probe and
    # evaluation run on the unwrapped task.
    step_model: nn.Module = task
    if world > 1:
        step_model = DistributedDataParallel(task, device_ids=[device] if device.type == "cuda" else None)
    optimizer, scheduler = build_optimizer(cfg, task)
    scaler = grad_scaler(device, tc.precision)
    meta = MetaWeighting(cfg.meta, task) if cfg.meta.enabled else None
    if meta is not None:
        meta.wnet.to(device)
    meta_set = data.splits.get("meta") if meta is not None else None
    if meta is not None and meta_set is None:
        raise ValueError("meta.enabled needs the meta split loaded")
    if meta_set is not None and world > 1 and len(meta_set) < cfg.meta.batch_size:
        raise ConfigError(
            f"meta.batch_size ({cfg.meta.batch_size}) exceeds the {len(meta_set)} meta videos; with "
            f"{world} processes every rank needs its full share: lower meta.batch_size"
        )

    start_step = 0
    if resume:
        if latest is not None:
            ckpt = load_checkpoint(latest)
            _check_resumable(ckpt.state["config"], to_dict(cfg), latest)
            task.load_state_dict(ckpt.tensors["task"])
            optimizer.load_state_dict(ckpt.state["optimizer"])
            scheduler.load_state_dict(ckpt.state["scheduler"])
            if "scaler" in ckpt.state:
                scaler.load_state_dict(ckpt.state["scaler"])
            if meta is not None:
                meta.wnet.load_state_dict(ckpt.tensors["wnet"])
                meta.optimizer.load_state_dict(ckpt.state["meta_optimizer"])
            _set_rng_state(ckpt.state["rng"])
            start_step = ckpt.step
    log = JsonlLog(out_dir / "log.jsonl", start_step if resume else None, enabled=main)
    weight_log = JsonlLog(out_dir / "weights.jsonl", start_step if resume else None, enabled=main) if tc.log_weights_every else None

    end_step = tc.steps if max_steps is None else min(tc.steps, start_step + max_steps)
    rows = shard_range(tc.batch_size, ctx.rank, world)
    meta_rows = shard_range(cfg.meta.batch_size, ctx.rank, world)
    accum = tc.accum_steps
    micro_rows = [slice(j * len(rows) // accum, (j + 1) * len(rows) // accum) for j in range(accum)]
    step_times: list[float] = []
    history: list[dict[str, Any]] = []
    window: list[float] = []
    meta_window: list[float] = []  # meta losses of the meta steps since the last log line
    t_start = time.perf_counter()
    bar = tqdm(range(start_step, end_step), desc=Path(tc.out_dir).name, unit="step", disable=not (tc.progress and main), initial=start_step, total=tc.steps)
    steps_per_epoch = len(train_set) // tc.batch_size
    step_batches = _StepBatches(train_set, meta_set, cfg, rows, meta_rows)
    batches = map_in_workers(step_batches, range(start_step, end_step), cfg.data.workers)
    for step, (batch, meta_batch) in zip(bar, batches, strict=True):
        t0 = time.perf_counter()
        task.train()
        train_set.note_failures(batch.pop("failed"))
        info = torch.stack([batch.pop("video_index"), batch.pop("caption_index")], dim=1)  # (n, 2)
        batch = {k: v.to(device) for k, v in batch.items()}
        # Frames travel as uint8 (from the data workers too) and are normalised on the device.
        batch["video"] = train_set.to_model_input(batch.pop("frames"))
        micro = _split_batch(batch, accum)
        meta_now = meta is not None and meta.is_meta_step(step)
        assert meta_now == (meta_batch is not None)
        if meta_batch is not None:
            assert meta_set is not None
            meta_set.note_failures(meta_batch.pop("failed"))
            meta_batch = {k: v.to(device) for k, v in meta_batch.items() if k not in ("video_index", "caption_index")}
            meta_batch["video"] = meta_set.to_model_input(meta_batch.pop("frames"))
        exact_meta = meta_now and cfg.meta.method == "exact"

        # 1. Per-sample losses of this rank's rows against the global batch. Without accumulation they
        #    keep their graph and serve both the meta step and the real update (one forward). With
        #    accumulation they come from cached, gradient-free embeddings.
        cache, partial_losses = None, None
        with meta_forward_context(exact_meta), autocast(device, tc.precision):
            if accum == 1:
                loss_per_sample = step_model(batch)["loss_per_sample"]
            else:
                cache = encode_for_cache(task, micro)
                with torch.no_grad():
                    loss_per_sample = task.loss(cache.video_emb, cache.text_emb)
                if exact_meta:
                    partial_losses = [task(mb, cache.at(r))["loss_per_sample"] for mb, r in zip(micro, micro_rows, strict=True)]

            # 2. Sample weights: uniform, or from the weighting net after its meta update.
            if meta is not None:
                result = meta.step(
                    task, loss_per_sample, meta_batch, step, partial_losses,
                    train_forward=lambda params: functional_call(task, params, (batch,))["loss_per_sample"],
                )
                weights, meta_loss = result.weights, result.meta_loss
            else:
                weights = torch.full_like(loss_per_sample, 1.0 / (len(loss_per_sample) * world))
                meta_loss = None
        weights = weights.detach()
        partial_losses = None

        # 3. The real update on the weighted loss. Each rank's loss is its share of the global weighted
        #    sum; DDP averages gradients over ranks, hence the factor world.
        optimizer.zero_grad(set_to_none=True)
        if accum == 1:
            # Same attention backend as the forward: gradient checkpointing recomputes in backward.
            with meta_forward_context(exact_meta):
                scaler.scale(world * (weights * loss_per_sample).sum()).backward()
        else:
            assert cache is not None
            for j, (mb, r) in enumerate(zip(micro, micro_rows, strict=True)):
                sync = nullcontext() if world == 1 or j == accum - 1 else step_model.no_sync()  # type: ignore[operator]
                with sync, autocast(device, tc.precision):
                    part = step_model(mb, cache.at(r))["loss_per_sample"]
                    scaler.scale(world * (weights * part).sum()).backward()
        scaler.unscale_(optimizer)
        grad_norm = nn.utils.clip_grad_norm_(task.parameters(), tc_clip) if (tc_clip := cfg.optim.grad_clip) > 0 else None
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        task.logit_scale.clamp_()
        step_times.append(time.perf_counter() - t0)

        # Logging sees the global batch: losses, weights and indices of every rank, in rank order.
        stats = gather_rows(torch.cat([torch.stack([loss_per_sample.detach().float(), weights.float()], 1).cpu().double(), info.double()], 1))
        global_losses, global_weights = stats[:, 0].float(), stats[:, 1].float()
        video_index, caption_index = stats[:, 2].long().tolist(), stats[:, 3].long().tolist()
        window.append(float(global_losses.mean()))
        if meta_loss is not None:
            meta_window.append(meta_loss)
        done = step + 1
        sources = [train_set.caption_source[i] for i in caption_index]
        noises = [train_set.caption_noise[i] for i in caption_index]
        if done % tc.log_every == 0 or done == end_step:
            record = {
                "step": done,
                "loss": statistics.fmean(window),
                "lr": scheduler.get_last_lr()[0],
                "logit_scale": float(task.logit_scale().detach()),
                "step_ms": 1000 * statistics.fmean(step_times[-tc.log_every :]),
            }
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            skipped = _merge_failures(data)
            if any(skipped.values()):
                record["skipped_videos"] = skipped
            if scaler.is_enabled():
                record["grad_scale"] = float(scaler.get_scale())
            if meta is not None:
                record["meta_loss"] = statistics.fmean(meta_window) if meta_window else None
                meta_window = []
                scaled = global_weights * len(global_weights)  # 1.0 = the uniform weight
                record["weight_by_source"] = _per_group_mean(scaled, sources)
                record["weight_by_noise"] = _per_group_mean(scaled, noises)
                if meta.skipped_updates:
                    record["meta_skipped"] = meta.skipped_updates
            window = []
            history.append(record)
            log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
        if weight_log is not None and done % tc.log_weights_every == 0:
            weight_log.write(
                {
                    "step": done,
                    "video_id": [train_set.records[i].id for i in video_index],
                    "source": sources,
                    "noise": noises,
                    "loss": [round(v, 5) for v in global_losses.tolist()],
                    "weight": [round(v, 6) for v in global_weights.tolist()],
                }
            )
        if done % steps_per_epoch == 0:
            # Epoch summary: which videos could not be used so far (load time and mid-run, every rank).
            log.write({"step": done, "epoch": done // steps_per_epoch, "skipped_videos": _merge_failures(data)})
        if tc.eval_every and done % tc.eval_every == 0 and done != tc.steps:
            val = evaluate(task, data.splits["val"], cfg)
            log.write({"step": done, "split": "val", **val})
        if done == end_step or (tc.checkpoint_every and done % tc.checkpoint_every == 0):
            if main:
                save_run_checkpoint(out_dir, done, cfg, task, optimizer, scheduler, meta, scaler, world)
            barrier()
    bar.close()
    wall_s = time.perf_counter() - t_start
    step_ms = 1000 * statistics.fmean(step_times) if step_times else float("nan")

    metrics: dict[str, float] = {}
    finished_before = broadcast_object((out_dir / "metrics.json").exists() if main else None)
    if end_step == tc.steps and (step_times or not finished_before):
        metrics = evaluate(task, data.splits[cfg.eval.split], cfg)
        _merge_failures(data)
        summary = {
            "split": cfg.eval.split,
            "steps": tc.steps,
            "world_size": world,
            "wall_s": wall_s,
            "step_ms": step_ms,
            "skipped_videos": data.skipped,
            **metrics,
        }
        if main:
            tmp = out_dir / "metrics.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2))
            tmp.replace(out_dir / "metrics.json")
    return TrainResult(
        out_dir=out_dir,
        metrics=metrics,
        wall_s=wall_s,
        step_ms=step_ms,
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
    task = build_task(cfg, tokenizer, pretrained=False)
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
