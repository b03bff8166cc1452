"""SynthVL: the project's embedded synthetic video-language benchmark.

Each clip shows one flat-coloured shape translating steadily across a plain background. Its captions
name five attributes: shape (5), colour (6), size (2), motion direction (4) and background (3). A
*concept* is a (colour, shape) pair, 30 in all. SynthVL reproduces, in miniature and with ground
truth, the three conditions MAMA targets:

- a long tail: training concepts follow a Zipf distribution, and every record carries its concept's
  frequency bucket ("head" / "mid" / "tail") so gains can be reported per bucket;
- imperfect LVLM captions: training videos get LLaVA-style captions, some vague and some with one
  attribute hallucinated, each labelled with its ``noise`` kind;
- a small clean, balanced meta set with human captions only.

Motion is only recoverable from several frames: the start position is drawn uniformly among those that
keep the whole trajectory in the frame, so over a clip's frames the position distribution is the same
for opposite directions and a single frame at an unknown time says nothing about the direction.

Everything is deterministic given ``SynthConfig.seed``: the JSONL files are byte-identical across runs,
and so are the videos for a given libx264 build (the encoder runs single-threaded).

Layout written by :func:`generate`::

    out_dir/.mama-synthvl.json          marks the folder as made by this generator; written first
    out_dir/videos/<split>/<id>.mp4     H.264, num_frames x size x size, RGB content
    out_dir/<split>.jsonl               one record per video (read with mama.data.records.read_jsonl)
    out_dir/synthvl.json                config, concepts with train counts and buckets; written last

It writes only into a new or empty folder or one it made itself, and deletes nothing it did not write.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mama.config import DataConfig
from mama.data.records import write_jsonl
from mama.data.video import write_video
from mama.fileio import atomic_path
from mama.tokenizer import split_words

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "CONCEPTS",
    "FORMAT_VERSION",
    "MOTIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "ForeignFolderError",
    "SynthConfig",
    "caption_words",
    "concept_table",
    "generate",
    "human_caption",
    "is_complete",
    "is_synthvl_folder",
    "lvlm_caption",
    "make_records",
    "parse_caption",
    "render_clip",
    "static_caption",
    "vague_caption",
]

FORMAT_VERSION = 1
METADATA_NAME = "synthvl.json"
# Written first into a folder generation starts on: the folder is ours even if generation is interrupted.
MARKER_NAME = ".mama-synthvl.json"
GENERATOR = "mama.data.synthvl"
SPLITS = ("train", "meta", "val", "test")
# Fixed salts keep each split's random stream independent of the others' sizes.
_SPLIT_SALT = {"concepts": 0, "train": 1, "meta": 2, "val": 3, "test": 4}

SHAPES = ("circle", "square", "triangle", "cross", "diamond")
# Saturated and far apart in RGB (every pair >= ~140 apart), so they survive yuv420p chroma
# subsampling in the object's interior and stay distinct after downscaling.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 200, 40),
    "blue": (45, 75, 235),
    "yellow": (235, 220, 40),
    "magenta": (220, 45, 220),
    "cyan": (40, 215, 225),
}
SIZES = ("small", "large")
MOTIONS = ("left", "right", "up", "down")
# Each background is >= ~130 RGB units from every object colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "gray": (110, 110, 110),
    "white": (235, 235, 235),
}
CONCEPTS: tuple[tuple[str, str], ...] = tuple(product(COLOURS, SHAPES))  # (colour, shape), 30
# Object extent (diameter / side) and travel over the clip, as fractions of the frame side. At 64 px
# this gives 14 / 26 px objects (7 / 13 px after downscaling to 32) and 32 px of travel.
_OBJECT_FRACTION = {"small": 14 / 64, "large": 26 / 64}
_TRAVEL_FRACTION = 0.5
# x264 settings: at 64 px "fast" matches "medium" in size and error and encodes ~20% faster; crf 18
# keeps the mean absolute error near 1.7 grey levels.
_CRF, _PRESET = 18, "fast"
# Unit vectors in image coordinates (x right, y down).
_MOTION_VECTOR = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


@dataclass
class SynthConfig:
    """SynthVL generation settings.

    Split sizes of meta, val and test are rounded to a multiple of the 30 concepts (they are balanced).
    """

    seed: int = 0
    num_train: int = 2000
    num_meta: int = 150
    num_val: int = 300
    num_test: int = 300
    num_frames: int = 16
    size: int = 64  # frame height = width, pixels
    fps: int = 8
    zipf_a: float = 1.0  # exponent of the long-tailed train concept distribution
    human_captions: int = 1  # per train (and meta) video
    lvlm_captions: int = 2  # per train video
    hallucination_rate: float = 0.3  # fraction of LVLM captions with one attribute wrong
    vague_rate: float = 0.2  # fraction of LVLM captions that are vague / generic
    eval_captions: int = 2  # human captions per val / test video
    bg_noise: float = 4.0  # std of the static background texture, grey levels
    # False: captions never mention the motion, like the alt text of a still image (the pretraining
    # corpus of mama.demos.pretrain: appearance from "image" captions, motion left to fine-tuning).
    caption_motion: bool = True

    def __post_init__(self) -> None:
        if self.size < 16 or self.size % 2:
            raise ValueError(f"size must be even and >= 16 (H.264 yuv420p), got {self.size}")
        if self.num_frames < 2:
            raise ValueError(f"num_frames must be >= 2 for motion to exist, got {self.num_frames}")
        if self.num_train < 0 or min(self.num_meta, self.num_val, self.num_test) < 1:
            raise ValueError("num_train must be >= 0 and num_meta, num_val, num_test >= 1")
        if not (0 <= self.hallucination_rate <= 1 and 0 <= self.vague_rate <= 1):
            raise ValueError("hallucination_rate and vague_rate must lie in [0, 1]")
        if self.hallucination_rate + self.vague_rate > 1:
            raise ValueError("hallucination_rate + vague_rate must not exceed 1")
        if self.human_captions < 0 or self.lvlm_captions < 0 or self.human_captions + self.lvlm_captions < 1:
            raise ValueError("train videos need at least one caption (human_captions + lvlm_captions >= 1)")
        if self.human_captions < 1:
            raise ValueError("human_captions must be >= 1: the meta set is captioned by humans only")
        if not self.caption_motion and (self.hallucination_rate or self.vague_rate):
            raise ValueError(
                "caption_motion=False makes a clean still-image corpus: set hallucination_rate and vague_rate to 0"
            )
        if self.eval_captions < 1:
            raise ValueError("eval_captions must be >= 1")
        if self.fps <= 0 or self.zipf_a < 0:
            raise ValueError("fps must be positive and zipf_a non-negative")
        num_combos = len(SIZES) * len(MOTIONS) * len(BACKGROUNDS)
        for name in ("num_val", "num_test"):
            per_concept = _per_concept(getattr(self, name))
            if per_concept > num_combos:
                raise ValueError(
                    f"{name}: {per_concept} videos per concept exceed the {num_combos} unique "
                    f"size x motion x background combinations (max {num_combos * len(CONCEPTS)})"
                )


def _per_concept(n: int) -> int:
    """Videos per concept of a balanced split of about ``n`` videos."""
    return max(1, round(n / len(CONCEPTS)))


def _concept_name(colour: str, shape: str) -> str:
    return f"{colour} {shape}"


# --------------------------------------------------------------------------------------------------
# Concept frequencies
# --------------------------------------------------------------------------------------------------


def concept_table(cfg: SynthConfig) -> list[dict[str, Any]]:
    """The 30 concepts with their Zipf rank, train count and bucket, most frequent first.

    Ranks come from a seeded permutation, so every colour and every shape appears among head and tail
    concepts alike. Counts are the Zipf(``zipf_a``) proportions of ``num_train`` rounded by largest
    remainder (they sum to ``num_train``); when ``num_train >= 30`` every concept gets at least one
    video. Buckets: first third "head", second "mid", last "tail".
    """
    rng = np.random.default_rng([cfg.seed, _SPLIT_SALT["concepts"]])
    order = rng.permutation(len(CONCEPTS))  # order[rank] = concept index
    ranks = np.arange(1, len(CONCEPTS) + 1, dtype=np.float64)
    probs = ranks ** (-cfg.zipf_a)
    probs /= probs.sum()
    exact = probs * cfg.num_train
    counts = np.floor(exact).astype(np.int64)
    # Largest remainder; ties go to the higher-ranked concept so counts stay non-increasing in rank.
    shortfall = cfg.num_train - int(counts.sum())
    by_remainder = sorted(range(len(CONCEPTS)), key=lambda r: (-(exact[r] - counts[r]), r))
    for r in by_remainder[:shortfall]:
        counts[r] += 1
    if cfg.num_train >= len(CONCEPTS):
        # A concept absent from train would make the tail a zero-shot problem, which is not what the
        # buckets are meant to measure; borrow from the head.
        for r in range(len(CONCEPTS) - 1, -1, -1):
            if counts[r] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[r] += 1
    third = len(CONCEPTS) // 3
    table = []
    for rank, concept_idx in enumerate(order):
        colour, shape = CONCEPTS[concept_idx]
        bucket = "head" if rank < third else "mid" if rank < 2 * third else "tail"
        table.append(
            {
                "concept": _concept_name(colour, shape),
                "colour": colour,
                "shape": shape,
                "rank": rank,
                "train_count": int(counts[rank]),
                "bucket": bucket,
            }
        )
    return table


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    """Boolean mask of ``shape`` given pixel offsets from its centre and its half extent (pixels); the QA
    clips (mama.data.synthvl_qa) draw their shapes with it too, so both datasets look alike."""
    adx, ady = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "square":
        # Slightly inset so its area is close to the circle's: size cues must not give away the shape.
        return np.maximum(adx, ady) <= 0.85 * half
    if shape == "diamond":
        return adx + ady <= half
    if shape == "cross":
        arm = 0.34 * half
        return ((adx <= half) & (ady <= arm)) | ((ady <= half) & (adx <= arm))
    if shape == "triangle":
        # Apex up, base at the bottom; width grows linearly from apex to base.
        return (dy >= -half) & (dy <= half) & (adx <= (dy + half) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def _object_geometry(size_name: str, frame_size: int) -> tuple[float, float]:
    """(half extent of the object, travel over the clip), both in pixels."""
    return _OBJECT_FRACTION[size_name] * frame_size / 2, _TRAVEL_FRACTION * frame_size


def render_clip(
    attributes: dict[str, str],
    start: tuple[float, float],
    num_frames: int,
    frame_size: int,
    bg_noise: float = 0.0,
    noise_seed: int = 0,
) -> np.ndarray:
    """Draw one SynthVL clip.

    Args:
        attributes: ``shape``, ``colour``, ``size``, ``motion``, ``background`` values.
        start: object centre ``(x, y)`` in the first frame, pixels (pixel centres at i + 0.5).
        num_frames: clip length T.
        frame_size: frame height = width, pixels.
        bg_noise: std of a static Gaussian texture on the background, grey levels. Static so that
            the only thing that moves is the object.
        noise_seed: seed of that texture.

    Returns:
        uint8 array ``(T, frame_size, frame_size, 3)`` RGB.
    """
    half, travel = _object_geometry(attributes["size"], frame_size)
    vx, vy = _MOTION_VECTOR[attributes["motion"]]
    step = travel / (num_frames - 1)
    coords = np.arange(frame_size, dtype=np.float64) + 0.5
    ys, xs = np.meshgrid(coords, coords, indexing="ij")

    background = np.empty((frame_size, frame_size, 3), dtype=np.float64)
    background[:] = BACKGROUNDS[attributes["background"]]
    if bg_noise > 0:
        texture = np.random.default_rng(noise_seed).normal(0.0, bg_noise, size=(frame_size, frame_size, 1))
        background += texture
    background = np.clip(np.rint(background), 0, 255).astype(np.uint8)
    colour = np.array(COLOURS[attributes["colour"]], dtype=np.uint8)

    clip = np.repeat(background[None], num_frames, axis=0)  # (T, H, W, 3)
    for t in range(num_frames):
        cx, cy = start[0] + vx * step * t, start[1] + vy * step * t
        clip[t][shape_mask(attributes["shape"], xs - cx, ys - cy, half)] = colour
    return clip


def _sample_start(rng: np.random.Generator, size_name: str, motion: str, frame_size: int) -> tuple[float, float]:
    """Uniform start centre among those keeping the whole trajectory inside the frame.

    Along the motion axis the start lies in [half, S - half - travel] shifted by +travel for negative
    directions; pooled over the clip's frames this gives identical position distributions for opposite
    directions, so the direction is not readable from one frame.
    """
    half, travel = _object_geometry(size_name, frame_size)
    vx, vy = _MOTION_VECTOR[motion]
    u_axis, u_perp = rng.random(2)
    along = half + u_axis * (frame_size - 2 * half - travel)
    perp = half + u_perp * (frame_size - 2 * half)
    if vx != 0:
        x = along if vx > 0 else along + travel
        return float(x), float(perp)
    y = along if vy > 0 else along + travel
    return float(perp), float(y)


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------

_HUMAN_SIZE = {"small": ("small", "tiny", "little"), "large": ("large", "big")}
_HUMAN_VERB = ("moves", "slides", "drifts", "travels", "glides")
_HUMAN_VERB_ING = ("moving", "sliding", "drifting", "travelling", "gliding")
_HUMAN_DIRECTION = {
    "left": ("left", "leftward", "to the left"),
    "right": ("right", "rightward", "to the right"),
    "up": ("up", "upward", "upwards"),
    "down": ("down", "downward", "downwards"),
}
_HUMAN_BACKGROUND = {"black": ("black",), "gray": ("gray", "grey"), "white": ("white",)}
_HUMAN_TEMPLATES = (
    "a {size} {colour} {shape} {verb} {direction} on a {background} background",
    "a {size} {colour} {shape} {verb} {direction} across a {background} screen",
    "on a {background} background, a {size} {colour} {shape} {verb} {direction}",
    "{size} {colour} {shape} {verb_ing} {direction} over a {background} backdrop",
    "the {colour} {shape} is {size} and {verb} {direction} against a {background} background",
    "a {background} screen with a {size} {colour} {shape} {verb_ing} {direction}",
)

_LVLM_SIZE = {"small": ("small", "tiny"), "large": ("large", "big")}
_LVLM_DIRECTION = {
    "left": ("from right to left", "towards the left", "to the left side of the screen"),
    "right": ("from left to right", "towards the right", "to the right side of the screen"),
    "up": ("from the bottom to the top", "upwards", "towards the top of the frame"),
    "down": ("from the top to the bottom", "downwards", "towards the bottom of the frame"),
}
_LVLM_BACKGROUND = {"black": ("black", "dark"), "gray": ("gray", "grey"), "white": ("white", "light")}
# Imitates LLaVA-1.5 answers to "In a sentence, describe the process in the video." after the
# authors' "image" -> "video" replacement: long, formulaic, padded with generic remarks.
_LVLM_TEMPLATES = (
    "The video shows a {size} {colour} {shape} moving {direction} across a {background} background.",
    "The video depicts a {size} {colour} {shape} that moves steadily {direction} against a {background} background.",
    "In the video, a {size} {colour} {shape} is seen moving {direction} on a {background} background, "
    "and it continues in this direction throughout the video.",
    "The video features a {size} {colour} {shape} gliding {direction} over a plain {background} background, "
    "creating a simple yet visually striking scene.",
    "The video captures a {size} {colour} {shape} as it moves {direction} across the screen, "
    "set against a {background} background.",
)
# Vague captions are true of every clip and name no attribute value at all.
_VAGUE_CAPTIONS = (
    "The video shows a colorful shape moving across the screen.",
    "An object is shown in the video against a plain background.",
    "The video depicts a geometric figure moving on a simple background.",
    "In the video, a shape travels across the frame.",
    "The video shows an object in motion against a plain backdrop.",
    "A single shape is seen moving throughout the video.",
)
_HALLUCINATABLE = ("colour", "shape", "motion", "size")
_VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": SIZES,
    "motion": MOTIONS,
    "background": tuple(BACKGROUNDS),
}


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


# Captions of a still image: every attribute but the motion.
_STATIC_HUMAN_TEMPLATES = (
    "a {size} {colour} {shape} on a {background} background",
    "a {size} {colour} {shape} on a {background} screen",
    "on a {background} background, a {size} {colour} {shape}",
    "{size} {colour} {shape} over a {background} backdrop",
    "the {colour} {shape} is {size} and sits on a {background} background",
)
_STATIC_LVLM_TEMPLATES = (
    "The video shows a {size} {colour} {shape} on a {background} background.",
    "The video depicts a {size} {colour} {shape} against a plain {background} background.",
    "In the video, a {size} {colour} {shape} is seen on a {background} background.",
)


def static_caption(attributes: dict[str, str], rng: np.random.Generator, lvlm: bool) -> str:
    """A caption naming shape, colour, size and background but not the motion (human or LLaVA style)."""
    sizes, backgrounds = (_LVLM_SIZE, _LVLM_BACKGROUND) if lvlm else (_HUMAN_SIZE, _HUMAN_BACKGROUND)
    return _pick(rng, _STATIC_LVLM_TEMPLATES if lvlm else _STATIC_HUMAN_TEMPLATES).format(
        size=_pick(rng, sizes[attributes["size"]]),
        colour=attributes["colour"],
        shape=attributes["shape"],
        background=_pick(rng, backgrounds[attributes["background"]]),
    )


def caption_words() -> list[str]:
    """Every word a SynthVL caption of any template can contain, sorted: a tokenizer built on a corpus
    that lacks some of them (the motion-free pretraining corpus) still covers every caption."""
    texts: list[str] = [
        *_HUMAN_TEMPLATES, *_LVLM_TEMPLATES, *_STATIC_HUMAN_TEMPLATES, *_STATIC_LVLM_TEMPLATES, *_VAGUE_CAPTIONS,
        *_HUMAN_VERB, *_HUMAN_VERB_ING, *SHAPES, *COLOURS,
    ]  # fmt: skip
    for table in (_HUMAN_SIZE, _HUMAN_DIRECTION, _HUMAN_BACKGROUND, _LVLM_SIZE, _LVLM_DIRECTION, _LVLM_BACKGROUND):
        texts += [option for options in table.values() for option in options]
    words = {w for text in texts for w in split_words(re.sub(r"\{[a-z_]+\}", " ", text))}
    return sorted(words)


def human_caption(attributes: dict[str, str], rng: np.random.Generator) -> str:
    """A short, human-style caption naming all five attributes correctly, with paraphrases."""
    verb_idx = int(rng.integers(len(_HUMAN_VERB)))
    return _pick(rng, _HUMAN_TEMPLATES).format(
        size=_pick(rng, _HUMAN_SIZE[attributes["size"]]),
        colour=attributes["colour"],
        shape=attributes["shape"],
        verb=_HUMAN_VERB[verb_idx],
        verb_ing=_HUMAN_VERB_ING[verb_idx],
        direction=_pick(rng, _HUMAN_DIRECTION[attributes["motion"]]),
        background=_pick(rng, _HUMAN_BACKGROUND[attributes["background"]]),
    )


def lvlm_caption(attributes: dict[str, str], rng: np.random.Generator) -> str:
    """A long, LLaVA-style caption describing ``attributes`` (which the caller may have corrupted)."""
    return _pick(rng, _LVLM_TEMPLATES).format(
        size=_pick(rng, _LVLM_SIZE[attributes["size"]]),
        colour=attributes["colour"],
        shape=attributes["shape"],
        direction=_pick(rng, _LVLM_DIRECTION[attributes["motion"]]),
        background=_pick(rng, _LVLM_BACKGROUND[attributes["background"]]),
    )


def vague_caption(rng: np.random.Generator) -> str:
    """A generic caption that fits every SynthVL clip."""
    return _pick(rng, _VAGUE_CAPTIONS)


def _hallucinate(attributes: dict[str, str], rng: np.random.Generator) -> dict[str, str]:
    """Copy of ``attributes`` with exactly one of colour / shape / motion / size set to a wrong value."""
    key = _pick(rng, _HALLUCINATABLE)
    wrong = [v for v in _VALUES[key] if v != attributes[key]]
    return {**attributes, key: _pick(rng, wrong)}


def _lvlm_caption_dict(attributes: dict[str, str], cfg: SynthConfig, rng: np.random.Generator) -> dict[str, str]:
    u = rng.random()
    if not cfg.caption_motion:
        return {"text": static_caption(attributes, rng, lvlm=True), "source": "lvlm", "noise": "none"}
    if u < cfg.vague_rate:
        return {"text": vague_caption(rng), "source": "lvlm", "noise": "vague"}
    if u < cfg.vague_rate + cfg.hallucination_rate:
        return {"text": lvlm_caption(_hallucinate(attributes, rng), rng), "source": "lvlm", "noise": "hallucinated"}
    return {"text": lvlm_caption(attributes, rng), "source": "lvlm", "noise": "none"}


def _human_caption_dicts(
    attributes: dict[str, str], n: int, rng: np.random.Generator, motion: bool = True
) -> list[dict[str, str]]:
    # Distinct paraphrases when possible: duplicate captions would waste the extra annotations.
    texts: list[str] = []
    for _ in range(n):
        text = human_caption(attributes, rng) if motion else static_caption(attributes, rng, lvlm=False)
        for _retry in range(10):
            if text not in texts:
                break
            text = human_caption(attributes, rng) if motion else static_caption(attributes, rng, lvlm=False)
        texts.append(text)
    return [{"text": t, "source": "human", "noise": "none"} for t in texts]


# Word -> attribute value, for parse_caption. Every caption word that names a value is listed here and
# no template uses these words for anything else.
_PARSE_WORDS: dict[str, dict[str, str]] = {
    "shape": {s: s for s in SHAPES},
    "colour": {c: c for c in COLOURS},
    "size": {"small": "small", "tiny": "small", "little": "small", "large": "large", "big": "large"},
    "background": {
        "black": "black", "dark": "black", "gray": "gray", "grey": "gray", "white": "white", "light": "white",
    },
    "motion": {
        "left": "left", "leftward": "left",
        "right": "right", "rightward": "right",
        "up": "up", "upward": "up", "upwards": "up", "top": "up",
        "down": "down", "downward": "down", "downwards": "down", "bottom": "down",
    },
}  # fmt: skip
_FROM_TO = re.compile(r"\bfrom (?:the )?(left|right|top|bottom) to (?:the )?(left|right|top|bottom)\b")


def parse_caption(text: str) -> dict[str, str | None]:
    """Read the attribute values a SynthVL caption states (None where it names none).

    Understands every template of this module, so tests and analyses can check captions against the
    ``attributes`` field. "from X to Y" counts as motion towards Y.

    Raises:
        ValueError: the caption names two different values of one attribute.
    """
    text = text.lower()
    match = _FROM_TO.search(text)
    if match:
        text = text[: match.start()] + f"to {match.group(2)}" + text[match.end() :]
    words = re.findall(r"[a-z]+", text)
    parsed: dict[str, str | None] = {}
    for attr, vocab in _PARSE_WORDS.items():
        values = {vocab[w] for w in words if w in vocab}
        if len(values) > 1:
            raise ValueError(f"caption names several {attr} values {sorted(values)}: {text!r}")
        parsed[attr] = values.pop() if values else None
    return parsed


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------


def _make_video_spec(attributes: dict[str, str], rng: np.random.Generator, cfg: SynthConfig) -> dict[str, Any]:
    """Everything a worker needs to render one clip; drawn here so results do not depend on scheduling."""
    return {
        "attributes": attributes,
        "start": _sample_start(rng, attributes["size"], attributes["motion"], cfg.size),
        "noise_seed": int(rng.integers(2**31)),
    }


def _split_items(
    split: str, cfg: SynthConfig, table: list[dict[str, Any]]
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(JSONL record, render spec) pairs of one split, in id order."""
    rng = np.random.default_rng([cfg.seed, _SPLIT_SALT[split]])
    bucket_of = {row["concept"]: row["bucket"] for row in table}

    # attributes of every clip, before shuffling
    clips: list[dict[str, str]] = []
    if split == "train":
        for row in table:
            for _ in range(row["train_count"]):
                clips.append(
                    {
                        "shape": row["shape"],
                        "colour": row["colour"],
                        "size": _pick(rng, SIZES),
                        "motion": _pick(rng, MOTIONS),
                        "background": _pick(rng, tuple(BACKGROUNDS)),
                    }
                )
    elif split == "meta":
        for colour, shape in CONCEPTS:
            for _ in range(_per_concept(cfg.num_meta)):
                clips.append(
                    {
                        "shape": shape,
                        "colour": colour,
                        "size": _pick(rng, SIZES),
                        "motion": _pick(rng, MOTIONS),
                        "background": _pick(rng, tuple(BACKGROUNDS)),
                    }
                )
    else:
        # Unique (size, motion, background) per concept makes every full attribute combination unique
        # within the split, so a perfect model can reach R@1 = 100%.
        per_concept = _per_concept(cfg.num_val if split == "val" else cfg.num_test)
        combos = list(product(SIZES, MOTIONS, BACKGROUNDS))
        for colour, shape in CONCEPTS:
            for combo_idx in rng.choice(len(combos), size=per_concept, replace=False):
                size_name, motion, background = combos[combo_idx]
                clips.append(
                    {"shape": shape, "colour": colour, "size": size_name, "motion": motion, "background": background}
                )
    clips = [clips[i] for i in rng.permutation(len(clips))]

    items = []
    for idx, attributes in enumerate(clips):
        clip_id = f"{split}_{idx:05d}"
        if split == "train":
            captions = _human_caption_dicts(attributes, cfg.human_captions, rng, cfg.caption_motion)
            captions += [_lvlm_caption_dict(attributes, cfg, rng) for _ in range(cfg.lvlm_captions)]
        elif split == "meta":
            captions = _human_caption_dicts(attributes, cfg.human_captions, rng, cfg.caption_motion)
        else:
            captions = _human_caption_dicts(attributes, cfg.eval_captions, rng, cfg.caption_motion)
        concept = _concept_name(attributes["colour"], attributes["shape"])
        record = {
            "id": clip_id,
            "video": f"videos/{split}/{clip_id}.mp4",
            "captions": captions,
            "concept": concept,
            "bucket": bucket_of[concept],
            "attributes": dict(attributes),
        }
        items.append((record, _make_video_spec(attributes, rng, cfg)))
    return items


def make_records(cfg: SynthConfig) -> dict[str, list[dict[str, Any]]]:
    """The JSONL records of every split, without rendering any video (cheap: for analyses and tests).

    Identical to what :func:`generate` writes for the same config.
    """
    table = concept_table(cfg)
    return {split: [record for record, _ in _split_items(split, cfg, table)] for split in SPLITS}


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def _render_and_write(task: tuple[str, dict[str, Any], int, int, int, float]) -> str:
    """Worker: render one clip and encode it to its path."""
    path, spec, num_frames, frame_size, fps, bg_noise = task
    clip = render_clip(spec["attributes"], spec["start"], num_frames, frame_size, bg_noise, spec["noise_seed"])
    write_video(path, clip, fps=fps, crf=_CRF, preset=_PRESET, deterministic=True)
    return path


def _init_worker() -> None:
    # Parallelism is across clips; nested threading would only oversubscribe the cores. Workers
    # never run torch ops, but libraries they load may read these (same as DataLoader workers do).
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = "1"
    import torch

    torch.set_num_threads(1)


def _pool_context() -> mp.context.BaseContext:
    """fork where available, like torch DataLoader workers.

    spawn/forkserver re-import the caller's ``__main__``: they fail for stdin or notebook code and
    re-run unguarded scripts. Fork is safe here because workers only run numpy and single-threaded
    libx264, never an OpenMP region inherited from the parent.
    """
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)


def _read_metadata(out_dir: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((out_dir / METADATA_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def is_complete(out_dir: str | os.PathLike[str], cfg: SynthConfig) -> bool:
    """Whether ``out_dir`` holds a finished SynthVL dataset generated with exactly ``cfg``.

    The metadata file is written last, so its presence with the same config and format version means
    every video and JSONL file was written.
    """
    out_dir = Path(out_dir)
    meta = _read_metadata(out_dir)
    return (
        meta is not None
        and meta.get("format_version") == FORMAT_VERSION
        and meta.get("config") == dataclasses.asdict(cfg)
        and all((out_dir / f"{split}.jsonl").is_file() for split in SPLITS)
    )


class ForeignFolderError(ValueError):
    """SynthVL generation was pointed at a folder that holds files it did not write there.

    A ValueError, so ``mama`` reports it in one line, without a traceback.
    """


def is_synthvl_folder(out_dir: str | os.PathLike[str]) -> bool:
    """Whether SynthVL generation made ``out_dir`` (complete or interrupted), so it may write there.

    Recognised by the marker :func:`generate` writes before anything else, or, for folders made before
    the marker existed, by a SynthVL metadata file.
    """
    out_dir = Path(out_dir)
    try:
        marker = json.loads((out_dir / MARKER_NAME).read_text(encoding="utf-8"))
        if isinstance(marker, dict) and marker.get("generator") == GENERATOR:
            return True
    except (OSError, ValueError):
        pass
    meta = _read_metadata(out_dir)
    return meta is not None and meta.get("name") == "SynthVL" and isinstance(meta.get("format_version"), int)


def _check_target(out_dir: Path, advice: str) -> str:
    """Why generation may write into ``out_dir`` ("new", "empty" or "ours"); raises ForeignFolderError
    (ending with ``advice``) for any other folder, and for a path that is not a folder."""
    if not out_dir.exists():
        return "new"
    if not out_dir.is_dir():
        raise ForeignFolderError(f"{out_dir} is a file, not a folder. {advice}")
    if is_synthvl_folder(out_dir):
        return "ours"
    entries = sorted(entry.name for entry in out_dir.iterdir())
    if not entries:
        return "empty"
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise ForeignFolderError(
        f"{out_dir} is neither empty nor a SynthVL folder made by mama (it holds {shown}); SynthVL is only "
        f"generated into an empty or new folder or one it made itself, so nothing there was changed. {advice}"
    )


def _write_marker(out_dir: Path) -> None:
    if (out_dir / MARKER_NAME).is_file():
        return
    marker = {
        "generator": GENERATOR,
        "format_version": FORMAT_VERSION,
        "note": "made by mama's SynthVL generator, which may rewrite or delete the files it generated here",
    }
    with atomic_path(out_dir / MARKER_NAME) as tmp:
        tmp.write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _remove_stale_videos(video_dir: Path, split: str, wanted: set[str]) -> None:
    """Delete this generator's own files in ``video_dir`` that the current config does not write: videos
    named like its ids (left by an earlier, larger config) and write_video's temporary files (left by an
    interrupted run). Nothing else there is touched."""
    stem = rf"{re.escape(split)}_\d{{5,}}"
    own = re.compile(rf"^(?:{stem}\.mp4|\.{stem}\.[0-9a-f]{{32}}\.tmp\.mp4)$")  # see mama.data.video.write_video
    for path in video_dir.iterdir():
        if own.match(path.name) and path.name not in wanted and path.is_file():
            path.unlink()


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def generate(
    out_dir: str | os.PathLike[str],
    cfg: SynthConfig = SynthConfig(),
    progress: bool = True,
    workers: int = 2,
    overwrite: bool = False,
) -> Path:
    """Generate SynthVL into ``out_dir`` (layout in the module docstring); idempotent.

    Writes only into a new or empty folder or one it made itself (:func:`is_synthvl_folder`): it first
    writes its marker there, so an interrupted generation is finished by the next call. Regenerating its
    own folder replaces the files it generates and deletes only its own stale videos; files others put
    there are left alone.

    Args:
        out_dir: dataset folder, created if needed.
        cfg: generation settings.
        progress: show a tqdm bar over videos and say (on stderr) what is generated or reused.
        workers: processes rendering and encoding videos; <= 1 runs in this process.
        overwrite: regenerate even if ``out_dir`` already holds a complete dataset with this config.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ForeignFolderError: ``out_dir`` holds files SynthVL did not write (nothing is changed).
    """
    out_dir = Path(out_dir)
    state = _check_target(out_dir, "Choose an empty or new output folder.")
    if not overwrite and is_complete(out_dir, cfg):
        _say(progress, f"SynthVL: reusing the complete dataset at {out_dir}")
        return out_dir
    reason = {"new": "a new folder", "empty": "an empty folder", "ours": "its own folder, replacing what it made"}
    _say(progress, f"SynthVL: generating into {out_dir} ({reason[state]})")
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_marker(out_dir)  # first: from here on the folder is recognisably ours, even if interrupted
    # Drop the completion marker next: a crash below must not leave an old marker over new files.
    (out_dir / METADATA_NAME).unlink(missing_ok=True)

    table = concept_table(cfg)
    split_items = {split: _split_items(split, cfg, table) for split in SPLITS}

    tasks = []
    for split, items in split_items.items():
        video_dir = out_dir / "videos" / split
        video_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_videos(video_dir, split, {f"{record['id']}.mp4" for record, _ in items})
        for record, spec in items:
            tasks.append((str(out_dir / record["video"]), spec, cfg.num_frames, cfg.size, cfg.fps, cfg.bg_noise))

    with tqdm(total=len(tasks), desc="SynthVL videos", unit="video", disable=not progress) as bar:
        if workers <= 1:
            for task in tasks:
                _render_and_write(task)
                bar.update()
        else:
            with _pool_context().Pool(workers, initializer=_init_worker) as pool:
                for _ in pool.imap_unordered(_render_and_write, tasks, chunksize=16):
                    bar.update()

    for split, items in split_items.items():
        write_jsonl(out_dir / f"{split}.jsonl", (record for record, _ in items))

    metadata = {
        "name": "SynthVL",
        "format_version": FORMAT_VERSION,
        "config": dataclasses.asdict(cfg),
        "splits": {
            split: {"jsonl": f"{split}.jsonl", "num_videos": len(items)} for split, items in split_items.items()
        },
        "concepts": table,
        "vocabulary": {attr: list(values) for attr, values in _VALUES.items()},
    }
    with atomic_path(out_dir / METADATA_NAME) as tmp:
        tmp.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return out_dir


def scaled_config(seed: int, scale: float = 1.0) -> SynthConfig:
    """SynthVL's default settings with every split size multiplied by ``scale`` (at least 30 videos)."""
    base = SynthConfig(seed=seed)
    if scale == 1.0:
        return base
    sizes = {k: max(30, round(getattr(base, k) * scale)) for k in ("num_train", "num_meta", "num_val", "num_test")}
    return dataclasses.replace(base, **sizes)


def ensure_dataset(cfg: DataConfig, progress: bool = True) -> Path:
    """The dataset root ``cfg.root``; with ``cfg.synthvl`` a SynthVL dataset is generated there first
    when absent or incomplete.

    Raises:
        ForeignFolderError: ``cfg.synthvl`` is set and ``cfg.root`` holds files SynthVL did not write,
            such as the user's own dataset (nothing is changed; the message names the settings to fix).
    """
    root = Path(cfg.root)
    if cfg.synthvl:
        _check_target(
            root,
            "To train on your own data in that folder set data.synthvl=false; to use SynthVL set data.root "
            "to an empty or new folder.",
        )
        generate(root, scaled_config(cfg.synthvl_seed, cfg.synthvl_scale), progress=progress)
    elif not root.is_dir():
        raise FileNotFoundError(f"data.root {root} does not exist")
    return root
