"""Retrieval data: annotation records of each split, held-out meta set, LVLM captions, the tokenizer,
and the clip sets (frames + caption pools) the retrieval task trains and evaluates on."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mama.config import Config, ConfigError
from mama.data.clips import ClipSet, load_clipset
from mama.data.datasets import read_dataset, split_shortfall
from mama.data.meta_split import hold_out_balanced
from mama.data.records import VideoRecord, add_lvlm_captions, read_lvlm_captions
from mama.data.synthvl import ensure_dataset
from mama.distributed import all_gather_object
from mama.models import create_tokenizer, get_spec

SPLITS = ("train", "meta", "val", "test")


@dataclass
class RunData:
    """Everything a run reads: the tokenizer and the clip sets it needs, by split name."""

    tokenizer: Any
    splits: dict[str, ClipSet]

    @property
    def skipped(self) -> dict[str, int]:
        return {name: len(s.skipped) for name, s in self.splits.items()}


def read_records(cfg: Config, root: Path, splits: tuple[str, ...]) -> dict[str, list[VideoRecord]]:
    """The records of each split in ``splits``, read with the ``data.format`` reader.

    With ``data.meta == ""`` and ``data.meta_holdout > 0`` the meta split is held out of the training
    split (balanced over caption-topic clusters), and the training split loses those videos whether or
    not this run uses meta weighting, so that runs with and without it train on the same videos. LVLM
    captions from ``data.lvlm_captions`` join the training pools.
    """
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
    root = ensure_dataset(cfg.data, progress)
    files = {
        "train": cfg.data.train,
        "meta": cfg.data.meta or cfg.data.train,
        "val": cfg.data.val,
        "test": cfg.data.test,
    }
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
            name,
            records[name],
            tokenizer,
            cfg.data.frame_size,
            slots,
            sources,
            decode=cfg.data.decode,
            cache_dir=root / ".cache",
            annotation=root / files[name],
            pixel_mean=spec.pixel_mean,
            pixel_std=spec.pixel_std,
            progress=progress,
        )
        if name in ("val", "test"):
            # A shrinking evaluation set changes every metric: say so, with the protocol's count.
            shortfall = split_shortfall(
                cfg.data.format, name, root / files[name], len(records[name]), len(loaded[name])
            )
            if shortfall:
                warnings.warn(shortfall, stacklevel=2)
    return RunData(tokenizer, loaded)


def merge_failures(data: RunData) -> dict[str, int]:
    """Share the mid-run decode failures of every rank (collective: all ranks call it at the same step)
    and return the skipped-video count of each split."""
    per_rank = all_gather_object({name: dict(split.failed) for name, split in data.splits.items()})
    for failures in per_rank:
        assert isinstance(failures, dict)
        for name, split in data.splits.items():
            split.note_failures(failures[name])
    return data.skipped
