"""Text-video retrieval as a :class:`mama.training.task.Task`: contrastive training on clip sets
(one sampled caption per video per step) and evaluation by ranking both directions."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mama.config import Config, ConfigError
from mama.data.clips import ClipSet
from mama.distributed import world_size
from mama.models import create_model, get_spec
from mama.tasks.retrieval.data import RunData, load_data, merge_failures
from mama.tasks.retrieval.evaluate import evaluate
from mama.tasks.retrieval.module import RetrievalModule
from mama.training.task import Batch


@dataclass
class RetrievalBatches:
    """``step -> (training batch, meta batch or None)`` of this rank: a pure function of the step."""

    train_set: ClipSet
    meta_set: ClipSet | None
    cfg: Config
    rows: range
    meta_rows: range

    def __call__(self, step: int) -> tuple[Batch, Batch | None]:
        cfg = self.cfg
        batch = self.train_set.train_batch(step, cfg.train.batch_size, cfg.data.num_frames, cfg.train.seed, self.rows)
        meta_batch = None
        if self.meta_set is not None and cfg.meta.enabled and step % cfg.meta.interval == 0:
            meta_batch = self.meta_set.random_batch(
                step, cfg.meta.batch_size, cfg.data.num_frames, cfg.train.seed, self.meta_rows
            )
        return batch, meta_batch


def build_retrieval_module(cfg: Config, tokenizer: Any, pretrained: bool = True) -> RetrievalModule:
    """A freshly built (seeded) module; ``pretrained`` loads the backbone's pretrained weights (when the
    model has any), which a resumed or loaded run skips: its weights come from a checkpoint."""
    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model, tokenizer)
    load_weights = get_spec(cfg.model.name).load_weights
    if pretrained and load_weights is not None:
        load_weights(model, cfg.model)
    return RetrievalModule(model, cfg.loss)


class Retrieval:
    """The retrieval task (``task: retrieval``). ``data``: a loaded :class:`RunData` to share between runs."""

    name = "retrieval"
    find_unused_parameters = False

    def __init__(self, cfg: Config, data: RunData | None = None, tokenizer: Any = None):
        self.cfg = cfg
        self.data = data
        self.tokenizer = data.tokenizer if data is not None else tokenizer

    def training_splits(self, meta: bool) -> tuple[str, ...]:
        splits = ("train", "meta", "val", "test") if meta else ("train", "val", "test")
        return splits if self.cfg.eval.split in splits else (*splits, self.cfg.eval.split)

    def load_data(self, splits: Sequence[str], progress: bool) -> None:
        self.data = load_data(self.cfg, tuple(splits), tokenizer=self.tokenizer, progress=progress)
        self.tokenizer = self.data.tokenizer

    def _data(self) -> RunData:
        if self.data is None:
            raise RuntimeError("load_data() first")
        return self.data

    def save_assets(self, out_dir: Path) -> None:
        self.tokenizer.save(out_dir / "tokenizer")

    def restore_assets(self, run_dir: Path, state: dict[str, Any]) -> None:
        """The tokenizer of a trained run, for evaluation or export."""
        self.tokenizer = get_spec(self.cfg.model.name).load_tokenizer(self.cfg.model, run_dir / state["tokenizer_dir"])

    def build_module(self, pretrained: bool) -> nn.Module:
        return build_retrieval_module(self.cfg, self.tokenizer, pretrained)

    @staticmethod
    def encoder(module: nn.Module) -> nn.Module:
        """The video-text model inside the module (what ``mama export`` and ``mama embed`` use)."""
        return module.model  # type: ignore[return-value]

    def steps_per_epoch(self, batch_size: int) -> int:
        return len(self._data().splits["train"]) // batch_size

    def data_position(self, step: int) -> dict[str, Any] | None:
        """Where the shard stream stands after ``step`` steps (None for file datasets, whose batches need
        no position): the shards' identity, the epoch and the samples each rank has consumed in it. The
        stream is a function of (seed, epoch, rank), so this follows from the step; the checkpoint records
        it and resume checks it, which catches shards rewritten or a changed world size."""
        manifest = self._data().manifest
        if manifest is None:
            return None
        per_epoch = self.steps_per_epoch(self.cfg.train.batch_size)
        world = world_size()
        epoch, position = divmod(step, per_epoch)
        shards = hashlib.sha256("".join(s["sha256"] for s in manifest["shards"]).encode()).hexdigest()
        return {
            "shards": shards, "steps_per_epoch": per_epoch, "world_size": world,
            "epoch": epoch, "samples_per_rank": position * (self.cfg.train.batch_size // world),
        }  # fmt: skip

    def step_batches(self, rows: range, meta_rows: range) -> RetrievalBatches:
        splits = self._data().splits
        meta_set = splits.get("meta") if self.cfg.meta.enabled else None
        if self.cfg.meta.enabled and meta_set is None:
            raise ValueError("meta.enabled needs the meta split loaded")
        if (
            meta_set is not None
            and len(meta_rows) < self.cfg.meta.batch_size
            and len(meta_set) < self.cfg.meta.batch_size
        ):
            raise ConfigError(
                f"meta.batch_size ({self.cfg.meta.batch_size}) exceeds the {len(meta_set)} meta videos; with several "
                "processes every rank needs its full share: lower meta.batch_size"
            )
        return RetrievalBatches(splits["train"], meta_set, self.cfg, rows, meta_rows)

    def to_device(self, batch: Batch, device: torch.device, meta: bool) -> tuple[Batch, Tensor]:
        clips = self._data().splits["meta" if meta else "train"]
        clips.note_failures(batch.pop("failed"))
        sample_ids = torch.stack([batch.pop("video_index"), batch.pop("caption_index")], dim=1)  # (n, 2)
        batch = {k: v.to(device) for k, v in batch.items()}
        # Frames travel as uint8 (from the data workers too) and are normalised on the device.
        batch["video"] = clips.to_model_input(batch.pop("frames"))
        return batch, sample_ids

    def _descriptions(self, sample_ids: Tensor) -> tuple[list[str], list[str]]:
        train_set = self._data().splits["train"]
        captions = sample_ids[:, 1].tolist()
        return [train_set.caption_source[i] for i in captions], [train_set.caption_noise[i] for i in captions]

    def step_stats(self, sample_ids: Tensor, weights: Tensor) -> dict[str, Any]:
        sources, noises = self._descriptions(sample_ids)
        return {
            "weight_by_source": per_group_mean(weights, sources),
            "weight_by_noise": per_group_mean(weights, noises),
        }

    def weight_record(self, sample_ids: Tensor) -> dict[str, Any]:
        train_set = self._data().splits["train"]
        sources, noises = self._descriptions(sample_ids)
        return {
            "video_id": [train_set.records[i].id for i in sample_ids[:, 0].tolist()],
            "source": sources,
            "noise": noises,
        }

    def merge_failures(self) -> dict[str, int]:
        return merge_failures(self._data())

    def evaluate(self, module: nn.Module, split: str) -> dict[str, float]:
        assert isinstance(module, RetrievalModule)
        return evaluate(module, self._data().splits[split], self.cfg)

    def final_metrics(self, module: nn.Module, split: str) -> dict[str, float]:
        return self.evaluate(module, split)


def per_group_mean(values: Tensor, groups: list[str]) -> dict[str, float]:
    """Mean of (N,) ``values`` per distinct label of ``groups`` (N,)."""
    out = {}
    for name in sorted(set(groups)):
        mask = torch.tensor([g == name for g in groups])
        out[name] = float(values[mask].mean())
    return out
