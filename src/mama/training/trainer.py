"""The training engine: one :class:`Trainer` for every task (retrieval, video QA).

The lifecycle has named stages, each a method: ``setup`` (run folder, data, model, optimisers, resume),
``train_step`` (the meta-weighted step of :mod:`mama.training.step`), ``evaluate``,
``save_checkpoint`` / ``load_checkpoint``, and ``cleanup``; :func:`run` strings them together. What is
specific to a task comes from its :class:`mama.training.task.Task`. Run folder layout::

    out_dir/config.yaml           resolved config
    out_dir/log.jsonl             one line per logged step, validation and epoch summary
    out_dir/tensorboard/          event files (train.loggers with "tensorboard")
    out_dir/weights.jsonl         per-sample losses and weights (when train.log_weights_every > 0)
    out_dir/checkpoints/step_*/   safetensors weights + JSON state (atomic, last k kept)
    out_dir/metrics.json          final evaluation on cfg.eval.split
    out_dir/tokenizer/ ...        the task's assets (tokenizer; answers.json for QA)

Launched by ``torchrun`` the same call trains with every process (see docs/distributed.md): each rank
takes its rows of the global batch, negatives span all ranks, and only rank 0 writes.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from mama.checkpoint import CheckpointError, find_latest_checkpoint, load_checkpoint, save_checkpoint
from mama.config import Config, ConfigError, resume_changes, save_config, to_dict
from mama.data.clips import map_in_workers
from mama.distributed import DistContext, barrier, broadcast_object, cleanup, gather_rows, init_distributed, shard_range
from mama.precision import grad_scaler
from mama.training.loggers import JsonlLogger, build_loggers, check_loggers
from mama.training.optim import build_optimizer
from mama.training.state import TrainState
from mama.training.step import StepOutput, StepSettings, meta_weighted_step
from mama.training.task import Task
from mama.weighting import MetaWeighting


@dataclass
class TrainResult:
    out_dir: Path
    metrics: dict[str, float]  # final evaluation on cfg.eval.split ({} when the run stopped early)
    wall_s: float  # training wall time (excluding data loading and the final evaluation)
    step_ms: float  # mean wall time of a training step (with meta.interval > 1 steps alternate in cost)
    steps_run: int
    history: list[dict[str, Any]] = field(default_factory=list)


def run(cfg: Config, task: Task, resume: bool = False, max_steps: int | None = None) -> TrainResult:
    """Train ``task`` on ``cfg``; with ``resume`` continue from the newest valid checkpoint in
    ``cfg.train.out_dir``. ``max_steps`` stops after that many steps (with a checkpoint), as a crash
    would; the schedule still follows ``cfg.train.steps``."""
    trainer = Trainer(cfg, task, init_distributed(cfg.train.device))
    failed = True
    try:
        trainer.setup(resume)
        result = trainer.train(max_steps)
        failed = False
        return result
    finally:
        trainer.cleanup(failed)


class Trainer:
    """One run of one task; see the module docstring for the stages."""

    def __init__(self, cfg: Config, task: Task, ctx: DistContext):
        self.cfg, self.task, self.ctx = cfg, task, ctx
        self.main = ctx.rank == 0
        self.out_dir = Path(cfg.train.out_dir)
        self.settings = StepSettings(
            cfg.train.precision, cfg.train.accum_steps, ctx.world_size, cfg.optim.grad_clip, cfg.loss.drop_frac
        )
        self.start_step = 0
        self.history: list[dict[str, Any]] = []
        self.step_times: list[float] = []
        self._windows: dict[str, list[float]] = {"loss": [], "meta_loss": []}  # since the last log line

    # --- setup ---------------------------------------------------------------------------------------

    def setup(self, resume: bool = False) -> None:
        """Run folder, data, model and optimisers; with ``resume`` the newest valid checkpoint's state."""
        tc = self.cfg.train
        check_batch_sizes(self.cfg, self.ctx.world_size)
        check_loggers(tc.loggers)
        if tc.threads > 0:
            torch.set_num_threads(tc.threads)
        checkpoints = self.out_dir / "checkpoints"
        found = broadcast_object(find_latest_checkpoint(checkpoints) if self.main and resume else None)
        latest = Path(found) if isinstance(found, Path) else None
        if latest is not None:
            # Before anything is written: a refused resume leaves the run folder as it was.
            changed = broadcast_object(self._config_changes(latest) if self.main else None)
            if isinstance(changed, list) and changed:
                raise ConfigError(f"cannot resume from {latest}: the config changed ({'; '.join(changed)})")
        self._prepare_run_dir(resume)
        self._load_data()
        self.state, self.step_module = self._build_state(pretrained=latest is None)
        if latest is not None:
            self.load_checkpoint(latest)
        keep = self.start_step if resume else None
        self.loggers = build_loggers(tc.loggers, self.out_dir, keep, enabled=self.main)
        self.weight_log = (
            JsonlLogger(self.out_dir / "weights.jsonl", keep, enabled=self.main) if tc.log_weights_every else None
        )

    def _prepare_run_dir(self, resume: bool) -> None:
        checkpoints = self.out_dir / "checkpoints"
        # Rank 0 looks at the run folder and tells the others, so that every rank takes the same branch.
        occupied = broadcast_object(any(checkpoints.glob("step_*")) if self.main else None)
        if not resume and not self.cfg.train.overwrite and occupied:
            raise ConfigError(
                f"{self.out_dir} already holds a run; resume it (--resume), choose another train.out_dir, "
                "or set train.overwrite=true to replace it"
            )
        barrier()  # every rank has looked at out_dir before rank 0 changes it
        if self.main:
            if not resume:
                # A fresh run replaces what an earlier run here wrote (never anything else).
                if checkpoints.exists():
                    shutil.rmtree(checkpoints)
                for name in ("metrics.json", "weights.jsonl"):
                    (self.out_dir / name).unlink(missing_ok=True)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out_dir / "config.yaml")

    def _load_data(self) -> None:
        if self.task.data is None:
            splits = self.task.training_splits(self.cfg.meta.enabled)
            # Rank 0 generates data and fills the frame cache; the others then read the cache.
            if self.main:
                self.task.load_data(splits, progress=self.cfg.train.progress)
            barrier()
            if not self.main:
                self.task.load_data(splits, progress=False)
        if self.main:
            self.task.save_assets(self.out_dir)

    def _build_state(self, pretrained: bool) -> tuple[TrainState, nn.Module]:
        cfg, device = self.cfg, self.ctx.device
        module = self.task.build_module(pretrained).to(device)
        step_module: nn.Module = module
        if self.ctx.world_size > 1:
            step_module = DistributedDataParallel(
                module,
                device_ids=[device] if device.type == "cuda" else None,
                find_unused_parameters=self.task.find_unused_parameters,
            )
        backbone = tuple(f"model.{p}" for p in getattr(getattr(module, "model", None), "backbone_prefixes", ()))
        optimizer, scheduler = build_optimizer(cfg.optim, module, cfg.train.steps, backbone)
        scaler = grad_scaler(device, cfg.train.precision)
        meta = MetaWeighting(cfg.meta, module) if cfg.meta.enabled else None
        if meta is not None:
            meta.wnet.to(device)
        return TrainState(module, optimizer, scheduler, scaler, meta), step_module

    # --- checkpoints ---------------------------------------------------------------------------------

    def save_checkpoint(self, step: int) -> Path:
        """Write everything a bitwise resume needs (rank 0 only)."""
        tensors, state = self.state.state_dict()
        state.update(world_size=self.ctx.world_size, config=to_dict(self.cfg), tokenizer_dir="tokenizer")
        position = self.task.data_position(step)  # streamed data (shards) records where it is
        if position is not None:
            state["data_position"] = position
        return save_checkpoint(self.out_dir / "checkpoints", step, tensors, state, keep_last=self.cfg.train.keep_last)

    def _config_changes(self, path: Path) -> list[str]:
        return resume_changes(load_checkpoint(path).state["config"], self.cfg)

    def load_checkpoint(self, path: Path) -> None:
        """Restore a checkpoint of this run, refusing one whose config trains something else."""
        ckpt = load_checkpoint(path)
        changed = resume_changes(ckpt.state["config"], self.cfg)
        if changed:
            raise ConfigError(f"cannot resume from {path}: the config changed ({'; '.join(changed)})")
        missing = [key for key in ("optimizer", "scheduler", "rng") if key not in ckpt.state]
        if missing:
            raise CheckpointError(
                f"{path}: holds no {', '.join(missing)} state, so it cannot be resumed exactly (video QA runs "
                "written before QA trained on the common engine kept only weights); start a new run"
            )
        position = self.task.data_position(ckpt.step)
        if ckpt.state.get("data_position") != position:
            raise CheckpointError(
                f"{path}: the data stream would not continue where it stopped (checkpoint: "
                f"{ckpt.state.get('data_position')}, now: {position}); resume on the same shards and world size"
            )
        self.state.load_state_dict(ckpt.tensors, ckpt.state)
        self.start_step = ckpt.step

    # --- the loop ------------------------------------------------------------------------------------

    def train(self, max_steps: int | None = None) -> TrainResult:
        tc, world, rank = self.cfg.train, self.ctx.world_size, self.ctx.rank
        end_step = tc.steps if max_steps is None else min(tc.steps, self.start_step + max_steps)
        rows = shard_range(tc.batch_size, rank, world)
        meta_rows = shard_range(self.cfg.meta.batch_size, rank, world)
        batches = map_in_workers(
            self.task.step_batches(rows, meta_rows), range(self.start_step, end_step), self.cfg.data.workers
        )
        bar = tqdm(
            range(self.start_step, end_step), desc=self.out_dir.name, unit="step",
            disable=not (tc.progress and self.main), initial=self.start_step, total=tc.steps,
        )  # fmt: skip
        t_start = time.perf_counter()
        for step, (batch, meta_batch) in zip(bar, batches, strict=True):
            t0 = time.perf_counter()
            out, sample_ids = self.train_step(step, batch, meta_batch)
            self.step_times.append(time.perf_counter() - t0)
            record = self._after_step(step + 1, end_step, out, sample_ids)
            if record is not None:
                bar.set_postfix(loss=f"{record['loss']:.3f}")
        bar.close()
        wall_s = time.perf_counter() - t_start
        step_ms = 1000 * statistics.fmean(self.step_times) if self.step_times else float("nan")
        metrics = self._final_evaluation(end_step, wall_s, step_ms)
        return TrainResult(self.out_dir, metrics, wall_s, step_ms, end_step - self.start_step, self.history)

    def train_step(
        self, step: int, batch: dict[str, Any], meta_batch: dict[str, Any] | None
    ) -> tuple[StepOutput, Tensor]:
        """One optimiser step on this rank's rows; returns its output and the rows' sample ids."""
        module, meta, device = self.state.module, self.state.meta, self.ctx.device
        module.train()
        model_batch, sample_ids = self.task.to_device(batch, device, meta=False)
        assert (meta is not None and meta.is_meta_step(step)) == (meta_batch is not None)
        model_meta_batch = self.task.to_device(meta_batch, device, meta=True)[0] if meta_batch is not None else None
        out = meta_weighted_step(self.state, model_batch, model_meta_batch, step, self.settings, self.step_module)
        self.state.step = step + 1
        return out, sample_ids

    def _after_step(self, done: int, end_step: int, out: StepOutput, sample_ids: Tensor) -> dict[str, Any] | None:
        """Logging, validation and checkpoint hooks after step ``done``; returns the log record, if any."""
        tc = self.cfg.train
        # Logging sees the global batch: losses, weights and sample ids of every rank, in rank order.
        local = torch.stack([out.loss_per_sample.float(), out.weights.float()], 1).cpu().double()
        # Gathered on the training device: NCCL process groups have no CPU backend.
        stats = gather_rows(torch.cat([local, sample_ids.double()], 1).to(self.ctx.device)).cpu()
        losses, weights, ids = stats[:, 0].float(), stats[:, 1].float(), stats[:, 2:].long()
        self._windows["loss"].append(float(losses.mean()))
        if out.meta_loss is not None:
            self._windows["meta_loss"].append(out.meta_loss)
        record = None
        if done % tc.log_every == 0 or done == end_step:
            record = self._log_record(done, out, weights, ids)
        if self.weight_log is not None and done % tc.log_weights_every == 0:
            self.weight_log.log(
                {
                    "step": done,
                    **self.task.weight_record(ids),
                    "loss": [round(v, 5) for v in losses.tolist()],
                    "weight": [round(v, 6) for v in weights.tolist()],
                }
            )
        steps_per_epoch = self.task.steps_per_epoch(tc.batch_size)
        if steps_per_epoch and done % steps_per_epoch == 0:
            # Epoch summary: which videos could not be used so far (load time and mid-run, every rank).
            epoch = done // steps_per_epoch
            self.loggers.log({"step": done, "epoch": epoch, "skipped_videos": self.task.merge_failures()})
        if tc.eval_every and done % tc.eval_every == 0 and done != tc.steps:
            self.loggers.log({"step": done, "split": "val", **self.evaluate("val")})
        if done == end_step or (tc.checkpoint_every and done % tc.checkpoint_every == 0):
            if self.main:
                self.save_checkpoint(done)
            barrier()
        return record

    def _log_record(self, done: int, out: StepOutput, weights: Tensor, sample_ids: Tensor) -> dict[str, Any]:
        state = self.state
        record: dict[str, Any] = {
            "step": done,
            "loss": statistics.fmean(self._windows["loss"]),
            "lr": state.scheduler.get_last_lr()[0],
            "step_ms": 1000 * statistics.fmean(self.step_times[-self.cfg.train.log_every :]),
        }
        logit_scale = getattr(state.module, "logit_scale", None)  # a task module with a contrastive loss
        if logit_scale is not None:
            record["logit_scale"] = float(logit_scale().detach())
        if out.grad_norm is not None:
            record["grad_norm"] = float(out.grad_norm)
        skipped = self.task.merge_failures()
        if any(skipped.values()):
            record["skipped_videos"] = skipped
        if state.scaler.is_enabled():
            record["grad_scale"] = float(state.scaler.get_scale())
        if state.meta is not None:
            metas = self._windows["meta_loss"]
            record["meta_loss"] = statistics.fmean(metas) if metas else None
            record.update(self.task.step_stats(sample_ids, weights * len(weights)))  # 1.0 = the uniform weight
            if state.meta.skipped_updates:
                record["meta_skipped"] = state.meta.skipped_updates
        self._windows = {"loss": [], "meta_loss": []}
        self.history.append(record)
        self.loggers.log(record)
        return record

    # --- evaluation and the end of the run -----------------------------------------------------------

    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics of the current model on ``split`` (every rank takes part)."""
        return self.task.evaluate(self.state.module, split)

    def _final_evaluation(self, end_step: int, wall_s: float, step_ms: float) -> dict[str, float]:
        """Evaluate on ``eval.split`` and write metrics.json when the run reached its last step (once:
        a resume of a finished run does not evaluate again)."""
        tc = self.cfg.train
        finished_before = broadcast_object((self.out_dir / "metrics.json").exists() if self.main else None)
        if end_step != tc.steps or (not self.step_times and finished_before):
            return {}
        metrics = self.task.final_metrics(self.state.module, self.cfg.eval.split)
        summary = {
            "split": self.cfg.eval.split, "steps": tc.steps, "world_size": self.ctx.world_size,
            "wall_s": wall_s, "step_ms": step_ms, "skipped_videos": self.task.merge_failures(), **metrics,
        }  # fmt: skip
        if self.main:
            tmp = self.out_dir / "metrics.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2))
            tmp.replace(self.out_dir / "metrics.json")
        return metrics

    def cleanup(self, failed: bool = False) -> None:
        """Close the loggers and leave the process group (without a barrier after a failure)."""
        for logger in (getattr(self, "loggers", None), getattr(self, "weight_log", None)):
            if logger is not None:
                logger.close()
        cleanup(self.ctx, failed)


def check_batch_sizes(cfg: Config, world: int) -> None:
    """Every rank and micro-batch must hold the same number of rows."""
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
