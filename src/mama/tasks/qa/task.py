"""Video question answering as a :class:`mama.training.task.Task`: the meta-weighted answer loss plus
the auxiliary video-caption contrastive term, evaluated by top-1 accuracy over every question."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mama.config import Config, ConfigError
from mama.data.clips import seeded_generator
from mama.data.sampling import segment_random_indices
from mama.distributed import all_gather_object
from mama.metrics.qa import AnswerVocab
from mama.models import create_model, get_spec
from mama.models.qa import VideoQAModel
from mama.tasks.qa.data import QAData, QASplit, load_qa_data
from mama.tasks.qa.evaluate import evaluate_qa, majority_baseline
from mama.tasks.qa.module import QAModule
from mama.training.task import Batch

ANSWERS_FILE = "answers.json"


@dataclass
class QABatches:
    """``step -> (training batch, meta batch or None)`` of this rank: a pure function of the step
    (epoch-wise shuffled questions, segment-random frames, one random caption per video)."""

    train_set: QASplit
    meta_set: QASplit | None
    cfg: Config
    rows: range
    meta_rows: range
    captions: bool  # training batches carry captions for the contrastive term

    def __call__(self, step: int) -> tuple[Batch, Batch | None]:
        cfg, n, bs = self.cfg, len(self.train_set), self.cfg.train.batch_size
        epoch, position = divmod(step, n // bs)
        index = torch.randperm(n, generator=seeded_generator(cfg.train.seed, 0, epoch))[
            position * bs : (position + 1) * bs
        ]
        g = seeded_generator(cfg.train.seed, 1, step)
        frame_index = segment_random_indices(self.train_set.clips.num_slots, cfg.data.num_frames, bs, g)
        batch = self.train_set.batch(index, frame_index, self.captions, g, self.rows)
        meta_batch = None
        if self.meta_set is not None and step % cfg.meta.interval == 0:
            mg = seeded_generator(cfg.train.seed, 2, step)
            meta_index = torch.randperm(len(self.meta_set), generator=mg)[: cfg.meta.batch_size]
            meta_frames = segment_random_indices(
                self.meta_set.clips.num_slots, cfg.data.num_frames, len(meta_index), mg
            )
            meta_batch = self.meta_set.batch(meta_index, meta_frames, captions=False, rows=self.meta_rows)
        return batch, meta_batch


def build_qa_module(cfg: Config, tokenizer: Any, pretrained: bool = True) -> QAModule:
    """A freshly built (seeded) QA module over the ``cfg.model`` encoder; ``pretrained`` loads the
    encoder's pretrained weights (when it has any)."""
    torch.manual_seed(cfg.train.seed)
    model = VideoQAModel(create_model(cfg.model, tokenizer), cfg.qa)
    load_weights = get_spec(cfg.model.name).load_weights
    if pretrained and load_weights is not None:
        load_weights(model.encoder, cfg.model)
    return QAModule(model, cfg.loss)


class VideoQA:
    """The video QA task (``task: qa``). ``data``: a loaded :class:`QAData` to share between runs."""

    name = "qa"

    def __init__(self, cfg: Config, data: QAData | None = None):
        self.cfg = cfg
        self.data = data
        self.tokenizer: Any = data.tokenizer if data is not None else None
        self.vocab: AnswerVocab | None = data.vocab if data is not None else None

    def training_splits(self, meta: bool) -> tuple[str, ...]:
        splits = ("train", "meta", "val", "test") if meta else ("train", "val", "test")
        return splits if self.cfg.eval.split in splits else (*splits, self.cfg.eval.split)

    def load_data(self, splits: Sequence[str], progress: bool) -> None:
        self.data = load_qa_data(self.cfg, tuple(splits), tokenizer=self.tokenizer, vocab=self.vocab, progress=progress)
        self.tokenizer, self.vocab = self.data.tokenizer, self.data.vocab

    def _data(self) -> QAData:
        if self.data is None:
            raise RuntimeError("load_data() first")
        return self.data

    def save_assets(self, out_dir: Path) -> None:
        self.tokenizer.save(out_dir / "tokenizer")
        self._data().vocab.save(out_dir / ANSWERS_FILE)

    def restore_assets(self, run_dir: Path, state: dict[str, Any]) -> None:
        """The tokenizer and answer vocabulary of a trained run, for evaluation or export."""
        self.tokenizer = get_spec(self.cfg.model.name).load_tokenizer(self.cfg.model, run_dir / state["tokenizer_dir"])
        self.vocab = AnswerVocab.load(run_dir / ANSWERS_FILE)

    def build_module(self, pretrained: bool) -> nn.Module:
        return build_qa_module(self.cfg, self.tokenizer, pretrained)

    @staticmethod
    def encoder(module: nn.Module) -> nn.Module:
        """The video-text encoder inside the QA model (what ``mama export`` and ``mama embed`` use)."""
        return module.model.encoder  # type: ignore[union-attr,return-value]

    @property
    def captions(self) -> bool:
        """Whether training batches carry captions: the contrastive term is on and some video has one."""
        return bool(self._data().splits["train"].has_caption.any()) and self.cfg.qa.contrastive_weight > 0

    @property
    def find_unused_parameters(self) -> bool:
        # A batch without any caption leaves the encoder's embedding heads and the logit scale without
        # gradient: with the contrastive term off, or when only some training videos have captions.
        return not (self.captions and bool(self._data().splits["train"].has_caption.all()))

    def steps_per_epoch(self, batch_size: int) -> int:
        return len(self._data().splits["train"]) // batch_size

    def data_position(self, step: int) -> dict[str, Any] | None:
        """QA reads random-access files only: its batches follow from the step, with no stream position."""
        return None

    def step_batches(self, rows: range, meta_rows: range) -> QABatches:
        splits, cfg = self._data().splits, self.cfg
        if len(splits["train"]) < cfg.train.batch_size:
            raise ValueError(f"batch size {cfg.train.batch_size} exceeds the {len(splits['train'])} training questions")
        meta_set = splits.get("meta") if cfg.meta.enabled else None
        if cfg.meta.enabled and meta_set is None:
            raise ValueError("meta.enabled needs the meta split loaded")
        if meta_set is not None and len(meta_rows) < cfg.meta.batch_size and len(meta_set) < cfg.meta.batch_size:
            raise ConfigError(
                f"meta.batch_size ({cfg.meta.batch_size}) exceeds the {len(meta_set)} meta questions; with several "
                "processes every rank needs its full share: lower meta.batch_size"
            )
        return QABatches(splits["train"], meta_set, cfg, rows, meta_rows, self.captions)

    def to_device(self, batch: Batch, device: torch.device, meta: bool) -> tuple[Batch, Tensor]:
        split = self._data().splits["meta" if meta else "train"]
        split.clips.note_failures(batch.pop("failed"))
        sample_ids = batch.pop("question_index")[:, None]  # (n, 1)
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["video"] = split.clips.to_model_input(batch.pop("frames"))
        return batch, sample_ids

    def step_stats(self, sample_ids: Tensor, weights: Tensor) -> dict[str, Any]:
        records = self._data().splits["train"].records
        noisy = torch.tensor([records[i].meta.get("noise", "none") != "none" for i in sample_ids[:, 0].tolist()])
        if not noisy.any() or noisy.all():
            return {}
        return {"weight_noisy": float(weights[noisy].mean()), "weight_clean": float(weights[~noisy].mean())}

    def weight_record(self, sample_ids: Tensor) -> dict[str, Any]:
        records = [self._data().splits["train"].records[i] for i in sample_ids[:, 0].tolist()]
        return {
            "question_id": [q.id for q in records],
            "video_id": [q.video_id for q in records],
            "qtype": [q.qtype for q in records],
            "noise": [str(q.meta.get("noise", "none")) for q in records],
        }

    def merge_failures(self) -> dict[str, int]:
        data = self._data()
        per_rank = all_gather_object({name: dict(split.clips.failed) for name, split in data.splits.items()})
        for failures in per_rank:
            assert isinstance(failures, dict)
            for name, split in data.splits.items():
                split.clips.note_failures(failures[name])
        return data.skipped

    def evaluate(self, module: nn.Module, split: str) -> dict[str, float]:
        assert isinstance(module, QAModule) and self.vocab is not None
        data = self._data()
        return evaluate_qa(
            module,
            data.splits[split],
            self.cfg,
            self.vocab,
            train=data.splits.get("train"),
        )

    def final_metrics(self, module: nn.Module, split: str) -> dict[str, float]:
        data = self._data()
        metrics = self.evaluate(module, split)
        metrics["majority_baseline"] = majority_baseline(data.splits["train"], data.splits[split])
        metrics["dropped_oov_train_questions"] = float(data.splits["train"].dropped_oov)
        metrics["lost_questions"] = float(data.lost.get(split, 0))  # no usable video; counted wrong
        return metrics
