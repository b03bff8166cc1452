"""Retrieval data: annotation records of each split, held-out meta set, LVLM captions, the tokenizer,
and the clip sets (frames + caption pools) the retrieval task trains and evaluates on."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mama.config import Config, ConfigError
from mama.data.clips import ClipSet, load_clipset
from mama.data.datasets import DATASET_FORMATS, read_dataset, split_shortfall
from mama.data.meta_split import hold_out_balanced
from mama.data.records import VideoRecord, add_lvlm_captions, read_lvlm_captions
from mama.data.shards import load_shard_clipset, read_manifest, shard_records
from mama.data.synthvl import ensure_dataset
from mama.distributed import all_gather_object, world_size
from mama.models import create_tokenizer, get_spec

SPLITS = ("train", "meta", "val", "test")


@dataclass
class RunData:
    """Everything a run reads: the tokenizer and the clip sets it needs, by split name; ``manifest``:
    the shards' manifest when the training split streams from them (``data.format: webdataset``)."""

    tokenizer: Any
    splits: dict[str, ClipSet]
    manifest: dict[str, Any] | None = None

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
    # Shards replace the training file only: the meta and evaluation splits stay random-access files.
    fmt = split_format(cfg) if dc.format == "webdataset" and wanted - {"train"} else dc.format
    records = {
        name: read_dataset(fmt, root / files[name], videos)
        for name in SPLITS
        if name in wanted and not (name == "meta" and holdout) and not (name == "train" and dc.format == "webdataset")
    }
    if dc.format == "webdataset" and "train" in wanted:
        records["train"] = shard_records(dc.urls, dc.manifest)[2]
    if dc.lvlm_captions and "train" in records:
        add_lvlm_files(records["train"], dc.lvlm_captions)
    if holdout and "train" in records:
        # A fixed seed, not train.seed: every run on this data (any seed, any variant) holds out the same videos.
        records["train"], meta = hold_out_balanced(records["train"], dc.meta_holdout, seed=0)
        if "meta" in splits:
            records["meta"] = meta
    return {name: records[name] for name in splits}


def add_lvlm_files(records: list[VideoRecord], paths: list[str]) -> None:
    """Add the LVLM captions of the ``mama augment`` files ``paths`` to the training ``records``."""
    for path in paths:
        added, unknown = add_lvlm_captions(records, read_lvlm_captions(path))
        if unknown:
            warnings.warn(
                f"{path}: {len(unknown)} video id(s) match no training video (e.g. {unknown[:3]}); their captions are not used",
                stacklevel=3,
            )
        if not added:
            warnings.warn(f"{path}: no LVLM caption matched a training video", stacklevel=3)


def split_format(cfg: Config) -> str:
    """The reader of the meta and evaluation files of a run that trains from shards: ``data.split_format``,
    or the format the shards were written from (their manifest's arguments)."""
    if cfg.data.split_format:
        return cfg.data.split_format
    from mama.data.shards import MANIFEST_NAME, expand_urls

    location = cfg.data.manifest or expand_urls(cfg.data.urls)[0].rsplit("/", 1)[0] + "/" + MANIFEST_NAME
    source = read_manifest(location)["args"].get("format", "")
    if source not in DATASET_FORMATS:
        raise ConfigError(
            f"the shards of {location} were written from {source!r}, not an annotation format: set data.split_format "
            f"to the reader of data.val / data.test ({', '.join(DATASET_FORMATS)})"
        )
    return str(source)


def _train_shards(cfg: Config, tokenizer: Any, progress: bool) -> tuple[ClipSet, dict[str, Any], Any]:
    """The training clip set streamed from ``data.urls``, its manifest, and the tokenizer (built from
    the index's captions unless given)."""
    dc = cfg.data
    manifest, urls, records = shard_records(dc.urls, dc.manifest)
    if dc.lvlm_captions:
        add_lvlm_files(records, dc.lvlm_captions)
    if tokenizer is None:
        tokenizer = create_tokenizer(
            cfg.model, [c.text for r in records for c in r.captions if c.source in dc.caption_sources]
        )
    spec = get_spec(cfg.model.name)
    plan = {
        "batch_size": cfg.train.batch_size, "world_size": world_size(), "seed": cfg.train.seed,
        "shuffle_shards": dc.shuffle_shards, "shuffle_buffer": dc.shuffle_buffer,
    }  # fmt: skip
    clips = load_shard_clipset(
        records, urls, manifest, tokenizer, dc.frame_size, dc.cached_frames or 2 * dc.num_frames, plan,
        dc.caption_sources, spec.pixel_mean, spec.pixel_std,
    )  # fmt: skip
    return clips, manifest, tokenizer


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
    shards = cfg.data.format == "webdataset" and "train" in splits
    manifest = None
    if shards:
        train_set, manifest, tokenizer = _train_shards(cfg, tokenizer, progress)
        splits = tuple(s for s in splits if s != "train")
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
            fmt = split_format(cfg) if cfg.data.format == "webdataset" else cfg.data.format
            shortfall = split_shortfall(fmt, name, root / files[name], len(records[name]), len(loaded[name]))
            if shortfall:
                warnings.warn(shortfall, stacklevel=2)
    if shards:
        loaded = {"train": train_set, **loaded}
    return RunData(tokenizer, loaded, manifest)


def merge_failures(data: RunData) -> dict[str, int]:
    """Share the mid-run decode failures of every rank (collective: all ranks call it at the same step)
    and return the skipped-video count of each split."""
    per_rank = all_gather_object({name: dict(split.failed) for name, split in data.splits.items()})
    for failures in per_rank:
        assert isinstance(failures, dict)
        for name, split in data.splits.items():
            split.note_failures(failures[name])
    return data.skipped
