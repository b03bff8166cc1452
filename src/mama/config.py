"""Typed configuration: dataclasses loaded from YAML, overridable with dotted ``key=value``.

Unknown keys are errors (naming the dotted path), values are type-checked and range-checked
(:data:`RULES`, plus the rules that tie settings together in :func:`check_consistency`) whenever a
config is built from a dict: :func:`load_config`, a checkpoint's config on resume or evaluation, a
model folder. :func:`save_config` writes the resolved config as YAML next to every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union

import yaml

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

# Enum-like settings. Checked when a config is loaded, so a typo fails at once, naming the key and the
# allowed values, instead of wherever the value is first used; other modules use them in signatures.
DecodeMode = Literal["cache", "stream"]
LossMode = Literal["official", "positives"]
MetaOptimizer = Literal["adam", "sgd"]
MetaMethod = Literal["exact", "first_order"]
Schedule = Literal["cosine", "constant"]
Precision = Literal["fp32", "bf16", "fp16"]
Split = Literal["train", "meta", "val", "test"]
AnswerFormat = Literal["open", "mc"]
Temporal = Literal["meanP", "seqTransf"]
TaskName = Literal["retrieval", "qa"]
LoggerName = Literal["jsonl", "tensorboard"]


def resumable(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A field that ``--resume`` may change: it affects logging, speed or where things go, never what
    is trained. Everything else must match the checkpoint's config (see :func:`resume_changes`).
    Pass ``default_factory=...`` instead of ``default`` for mutable defaults."""
    return field(default=default, metadata={"resume": True}, **kw)


@dataclass
class DataConfig:
    root: str = "data/synthvl"  # folder of the annotation files (JSONL: video paths are relative to it)
    # Annotation layout, a reader of mama.data.datasets: "jsonl" (ours), "msrvtt", "msrvtt_clipvip",
    # "didemo", "activitynet", "msvd", "lsmdc". docs/datasets.md shows each layout.
    format: str = "jsonl"
    videos: str = ""  # folder searched (recursively) for videos by id; "" = the paths in the JSONL files
    train: str = "train.jsonl"
    # Small clean balanced set for the weighting net (human captions only). "" with meta_holdout > 0:
    # hold that many training videos out instead, balanced over caption-topic clusters.
    meta: str = "meta.jsonl"
    meta_holdout: int = 0
    val: str = "val.jsonl"
    test: str = "test.jsonl"
    lvlm_captions: list[str] = field(
        default_factory=list
    )  # JSONL files of `mama augment`: join the train pools as "lvlm"
    decode: DecodeMode = "cache"  # "cache": decode once into a safetensors frame cache | "stream": decode every batch
    workers: int = resumable(0)  # data-loading worker processes (stream decoding); 0 = in the training process
    cached_frames: int = 0  # frames kept per video (cache) or sampling slots (stream); 0 = 2 x num_frames
    synthvl: bool = True  # root is a SynthVL dataset: generate it there when absent
    synthvl_seed: int = 0
    synthvl_scale: float = 1.0  # multiplies SynthVL's split sizes (the quick demo uses a smaller set)
    num_frames: int = 8  # frames per clip fed to the model
    frame_size: int = 32  # decoded frames are resized to frame_size x frame_size
    caption_sources: list[str] = field(default_factory=lambda: ["human", "lvlm"])  # training caption pool
    # format "webdataset": the training split streams from tar shards written by `mama shard` (a brace
    # pattern of local paths, http(s):// URLs or pipe: commands; docs/datasets.md). Moving the shards
    # (local <-> HTTP) does not change what is trained: the checkpoint's data position checks the data.
    urls: str = resumable("")
    manifest: str = resumable("")  # the shards' manifest.json (path or URL); "" = next to the first shard
    split_format: str = ""  # reader of data.meta/val/test with format "webdataset"; "" = the shards' source format
    # samples of the per-rank shuffle; 0 = none. A data-loading process holds the video bytes of at most
    # shuffle_buffer + batch_size / world_size samples (mama.data.shards.ShardFrames).
    shuffle_buffer: int = 256
    shuffle_shards: bool = True  # a seeded shard order per epoch (False: manifest order)


@dataclass
class ModelConfig:
    name: str = "tiny_dual_encoder"
    embed_dim: int = 128
    width: int = 128
    heads: int = 4
    video_layers: int = 2
    text_layers: int = 2
    stem_channels: int = 16
    frame_size: int = 32
    max_frames: int = 16
    max_text_length: int = 32
    grad_checkpointing: bool = False  # recompute transformer blocks in backward: less memory, ~30% slower
    pretrained: str = ""  # pretrained backbone: Hugging Face hub id or local folder (e.g. openai/clip-vit-base-patch32)
    temporal: Temporal = "meanP"  # CLIP frame aggregation: "meanP" (mean pooling) | "seqTransf" (temporal transformer)
    temporal_layers: int = 4  # seqTransf depth
    # CLIP-ViP (model "clip_vip", mama.models.clip_vip; the authors' settings in their comments). None of
    # these apply to the other models.
    add_cls_num: int = 3  # learned video proxy tokens besides [CLS] (authors: 3)
    temporal_size: int = 12  # frames the temporal embedding is learned for; other counts interpolate it (authors: 12)
    temporal_embed: bool = True  # learned temporal embedding added to every patch token of a frame
    adapters: bool = False  # the MAMA authors' bottleneck adapters (True) or a plain CLIP-ViP (False)
    adapter_dim: int = 2048  # hidden width of every adapter (authors: 2048)
    # CLIP config and tokenizer (hub id or folder, e.g. openai/clip-vit-base-patch32) when model.pretrained
    # is a CLIP-ViP checkpoint file, which holds weights only; "" = model.pretrained itself.
    clip_config: str = ""


@dataclass
class LossConfig:
    margin: float = 0.0  # mu, radians; 0 = InfoNCE
    mode: LossMode = "official"
    # log of the initial scale. CLIP trains from scratch at ln(1/0.07) = 2.66; the authors fine-tune a
    # pretrained CLIP whose scale already sits at ln 100 (use that for pretrained backbones).
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(200.0)
    learn_logit_scale: bool = True
    # The small-loss trick (Co-teaching, Han et al. 2018; loss truncation, Kang & Hashimoto 2020): each
    # step gives weight 0 to this fraction of the global batch's highest losses and equal weight to the
    # rest. A baseline for meta weighting, whose learned map on SynthVL is monotone decreasing in the
    # loss; 0 disables. Not combined with meta.enabled.
    drop_frac: float = 0.0


@dataclass
class MetaConfig:
    enabled: bool = False
    hidden: int = 64  # weighting-net hidden units (authors: 64)
    zero_init: bool = True  # output layer starts at zero: flat map, uniform weights (False: PyTorch init)
    optimizer: MetaOptimizer = "adam"
    # 1e-3 (Meta-Weight-Net's value) saturated the sigmoid at 1 for every loss within ~500 SynthVL
    # steps, after which the weights are uniform and the net gets no gradient; 1e-4 stays responsive.
    lr: float = 1e-4  # per training step: with interval k each weighting-net update uses k * lr
    weight_decay: float = 0.0
    virtual_lr: float = 0.3  # alpha of the virtual SGD step
    # Meta step every k training steps. 2, from benchmarks/synthvl_variants.py + meta_overhead.py on
    # SynthVL (3 seeds each, README "The cost of the meta step"): every 2nd step (lr scaled as above)
    # kept 108% of the every-step gain over InfoNCE in t2v R@1 at 1.16x the cost of a plain step
    # (every step: 1.38x); every 4th step (unscaled lr) kept only 48%.
    interval: int = 2
    # Name prefixes of the parameters that take the virtual step; [] = all. On the from-scratch model a
    # virtual SGD step over all parameters is dominated by the conv stem (gradient norm ~15 vs ~1.5
    # elsewhere): even alpha = 0.001 doubles the meta loss, so its meta-gradient is meaningless. The
    # projection heads + logit scale (FaMUS-style) give a well-behaved virtual step at 1.3x the cost of a
    # plain step instead of 3.6x.
    virtual_params: list[str] = field(default_factory=lambda: ["model.video.head", "model.text.head", "logit_scale"])
    batch_size: int = 64  # meta-set batch per meta step (global: split across ranks)
    normalize: bool = True  # weights sum to 1 within a (global) batch
    # "exact": second-order meta-gradient through the virtual step (Meta-Weight-Net).
    # "first_order": no second-order graph; the meta-gradient is linearised at the current parameters
    # (see mama.weighting.MetaWeighting.first_order_update).
    method: MetaMethod = "exact"
    fd_step: float = 1e-2  # first_order: parameter-space length of the finite-difference probe


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8  # AdamW epsilon (open_clip uses 1e-6 for ViTs)
    warmup_frac: float = 0.05  # fraction of steps with linear warm-up
    schedule: Schedule = "cosine"
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # Learning rate of the pretrained backbone's parameters (the model's ``backbone_prefixes``); new layers
    # (temporal transformer, weighting heads) and the logit scale use ``lr``. None: ``lr`` for everything.
    backbone_lr: float | None = None


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 1500
    batch_size: int = 64  # global: split over ranks, then over accum_steps micro-batches
    accum_steps: int = resumable(1)  # micro-batches per rank and step; negatives still span the whole batch
    out_dir: str = resumable("runs/default")
    overwrite: bool = resumable(False)  # replace a finished or partial run in out_dir (default: refuse)
    device: str = resumable("auto")  # "auto" (CUDA when present) | "cpu" | "cuda" | "cuda:1" ...
    precision: Precision = "fp32"
    log_every: int = resumable(25)
    eval_every: int = resumable(0)  # validation every k steps (0: only at the end)
    checkpoint_every: int = resumable(0)  # 0: only at the end
    keep_last: int = resumable(2)
    log_weights_every: int = resumable(0)  # write per-sample losses and weights every k steps (0: never)
    threads: int = resumable(0)  # torch intra-op threads; 0 leaves torch's default
    progress: bool = resumable(True)
    # Metric sinks, written by rank 0 only. "jsonl" (out_dir/log.jsonl) is always recommended: a
    # dependency-free record that a resume trims back to the checkpoint's step. "tensorboard" writes
    # event files under out_dir/tensorboard and needs the `tensorboard` extra.
    loggers: list[LoggerName] = resumable(default_factory=lambda: ["jsonl"])


@dataclass
class EvalConfig:
    split: Split = "test"
    batch_size: int = resumable(256)
    chunk_size: int = resumable(1024)
    # Also report dual-softmax (DSL) re-ranked metrics as dsl_*: they use statistics of the whole test
    # query set, so they are an inference-time trick, reported next to (never instead of) the raw ones.
    dsl: bool = resumable(False)


@dataclass
class QAConfig:
    """Video question answering (``task: qa``): model head sizes and the QA annotation files."""

    num_answers: int = 1000  # K most frequent training answers (open-ended head size)
    fusion_layers: int = 2
    fusion_width: int = 256
    fusion_heads: int = 4
    contrastive_weight: float = 0.25  # lambda of the auxiliary video-caption contrastive loss (authors: 0.25)
    dropout: float = 0.1
    # Which head the model has: "open" (classify over the answer vocabulary) or "mc" (score candidates).
    # One head only: the other would never get a gradient (dead weights, and DDP would wait for them).
    answer_format: AnswerFormat = "open"
    format: str = "jsonl"  # QA annotation layout (mama.data.qa_datasets.QA_FORMATS); files relative to data.root
    train: str = "qa_train.jsonl"
    meta: str = "qa_meta.jsonl"  # clean, balanced questions for the weighting net
    # With meta "" : hold this many training questions out as the meta set, balanced over
    # (question type, answer); questions about their videos leave training too.
    meta_holdout: int = 0
    val: str = "qa_val.jsonl"
    test: str = "qa_test.jsonl"
    synthvl_noise_rate: float = 0.3  # SynthVL QA: fraction of training questions with a wrong answer


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    qa: QAConfig = field(default_factory=QAConfig)
    task: TaskName = "retrieval"  # "qa": open-ended video question answering (mama.qa.engine)


class ConfigError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------------
# Allowed values. _coerce checks types; these rules check ranges and closed sets of strings, so that a
# value at zero or below fails when the config loads, naming its key, instead of deep inside a run, after
# it (an evaluation setting), or never (a run that "succeeds" on a nonsensical value). Every int, float
# and free-form str setting has an entry (tests/test_config.py fails for a new one without); Literal
# settings are checked by their type.


@dataclass(frozen=True)
class Rule:
    """The allowed values of one setting: ``ok(value)`` decides, ``allowed`` says them in messages."""

    ok: Callable[[Any], bool]
    allowed: str


def at_least(low: float) -> Rule:
    return Rule(lambda v: v >= low, f">= {low}")


def above(low: float) -> Rule:
    return Rule(lambda v: v > low, f"> {low}")


def within(low: float, high: float, high_name: str = "") -> Rule:
    """``low <= value < high``; ``high_name`` says the bound in messages (default: its value)."""
    return Rule(lambda v: low <= v < high, f"in [{low}, {high_name or high})")


def one_of(*values: str) -> Rule:
    return Rule(lambda v: v in values, "one of " + ", ".join(map(repr, values)))


ANY_NUMBER = Rule(lambda v: True, "any finite number")
ANY_TEXT = Rule(lambda v: True, "any string")  # a path or name checked where it is opened
NONEMPTY = Rule(lambda v: bool(v.strip()), "a non-empty string")
SEED = Rule(lambda v: 0 <= v < 2**63, ">= 0 and < 2**63")  # torch.manual_seed's range

# The readers of mama.data.datasets.DATASET_FORMATS and mama.data.qa_datasets.QA_FORMATS, which this
# foundation module may not import; tests/test_config.py checks that the lists agree.
DATASET_FORMAT_NAMES = ("jsonl", "msrvtt", "msrvtt_clipvip", "didemo", "activitynet", "msvd", "lsmdc")
QA_FORMAT_NAMES = ("jsonl", "msrvtt_qa", "msvd_qa", "tgif_qa", "nextqa", "causal_vidqa")

# Dotted name -> allowed values; each bound is the one the code using the setting needs (or below which
# the run means nothing: a learning rate of 0, a batch of 0 rows).
RULES: dict[str, Rule] = {
    "data.root": ANY_TEXT,
    "data.format": one_of(DATASET_FORMAT_NAMES[0], "webdataset", *DATASET_FORMAT_NAMES[1:]),
    "data.urls": ANY_TEXT,  # expanded and opened at load (mama.data.shards)
    "data.manifest": ANY_TEXT,
    "data.split_format": one_of("", *DATASET_FORMAT_NAMES),
    "data.shuffle_buffer": at_least(0),
    "data.videos": ANY_TEXT,
    "data.train": ANY_TEXT,  # the split files a task reads: check_consistency
    "data.meta": ANY_TEXT,
    "data.meta_holdout": at_least(0),
    "data.val": ANY_TEXT,
    "data.test": ANY_TEXT,
    "data.lvlm_captions": ANY_TEXT,
    "data.workers": at_least(0),
    "data.cached_frames": at_least(0),
    "data.synthvl_seed": SEED,
    "data.synthvl_scale": above(0),
    "data.num_frames": at_least(1),
    "data.frame_size": at_least(1),
    "data.caption_sources": Rule(
        lambda v: bool(v) and set(v) <= {"human", "lvlm"}, "a non-empty list of 'human' and / or 'lvlm'"
    ),
    "model.name": ANY_TEXT,  # the model registry (mama.models) says which exist, when the model is built
    "model.embed_dim": at_least(1),
    "model.width": at_least(1),
    "model.heads": at_least(1),
    "model.video_layers": at_least(1),  # 0: each tower returns its [CLS] input, the same for every video
    "model.text_layers": at_least(1),  # ... or caption
    "model.stem_channels": at_least(1),
    "model.frame_size": at_least(1),
    "model.max_frames": at_least(1),
    "model.max_text_length": at_least(3),  # the word tokenizer's start and end tokens and one word
    "model.pretrained": ANY_TEXT,
    "model.temporal_layers": at_least(0),  # seqTransf needs >= 1: check_consistency
    "model.add_cls_num": at_least(0),  # 0: [CLS] is the only proxy
    "model.temporal_size": at_least(1),
    "model.adapter_dim": at_least(1),
    "model.clip_config": ANY_TEXT,
    "loss.margin": within(0, math.pi / 2, "pi/2"),  # radians; from pi/2 on, cos(theta - mu) favours right angles
    "loss.init_logit_scale": at_least(0),  # mama.losses.LogitScale keeps the log scale in [0, max]
    "loss.max_logit_scale": at_least(0),
    "loss.drop_frac": within(0, 1),
    "meta.hidden": at_least(1),
    "meta.lr": above(0),
    "meta.weight_decay": at_least(0),
    "meta.virtual_lr": above(0),  # 0: no virtual step, so a meta-gradient of exactly 0
    "meta.interval": at_least(1),
    "meta.virtual_params": ANY_TEXT,
    "meta.batch_size": at_least(1),
    "meta.fd_step": above(0),
    "optim.lr": above(0),
    "optim.weight_decay": at_least(0),
    "optim.beta1": within(0, 1),
    "optim.beta2": within(0, 1),
    "optim.eps": above(0),  # 0 divides by zero where a second moment is 0: NaN weights, "perfect" recall
    "optim.warmup_frac": within(0, 1),
    "optim.grad_clip": at_least(0),  # 0 disables clipping
    "optim.backbone_lr": at_least(0),  # 0 freezes the pretrained backbone
    "train.seed": SEED,
    "train.steps": at_least(1),
    "train.batch_size": at_least(1),
    "train.accum_steps": at_least(1),
    "train.out_dir": NONEMPTY,
    "train.device": Rule(
        lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None, "'auto', 'cpu', 'mps', 'cuda' or 'cuda:<n>'"
    ),
    "train.log_every": at_least(1),
    "train.eval_every": at_least(0),  # 0: at the end only
    "train.checkpoint_every": at_least(0),  # 0: at the end only
    "train.keep_last": at_least(1),
    "train.log_weights_every": at_least(0),  # 0: never
    "train.threads": at_least(0),  # 0: torch's default
    "eval.batch_size": at_least(1),
    "eval.chunk_size": at_least(1),
    "qa.num_answers": at_least(1),
    "qa.fusion_layers": at_least(1),
    "qa.fusion_width": at_least(1),
    "qa.fusion_heads": at_least(1),
    "qa.contrastive_weight": at_least(0),
    "qa.dropout": within(0, 1),
    "qa.format": one_of(*QA_FORMAT_NAMES),
    "qa.train": ANY_TEXT,
    "qa.meta": ANY_TEXT,
    "qa.meta_holdout": at_least(0),
    "qa.val": ANY_TEXT,
    "qa.test": ANY_TEXT,
    "qa.synthvl_noise_rate": within(0, 1),  # mama.data.synthvl_qa.make_questions
}


def check_value(name: str, value: Any) -> None:
    """Raise ConfigError unless ``value`` is allowed for the setting ``name`` (a key of :data:`RULES`)."""
    rule = RULES.get(name)
    if rule is None or value is None:  # None: an optional setting left unset
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    if not rule.ok(value):
        raise ConfigError(f"{name}: expected {rule.allowed}, got {value!r}")


def check_consistency(cfg: Config) -> None:
    """Raise ConfigError, naming the settings, where settings that are each valid do not fit together."""
    data, model, train = cfg.data, cfg.model, cfg.train
    pairs = [
        # (holds, message)
        (
            not (cfg.loss.drop_frac > 0 and cfg.meta.enabled),
            "loss.drop_frac (the small-loss baseline) and meta.enabled are two ways to weight samples: use one",
        ),
        (
            train.batch_size % train.accum_steps == 0,
            f"train.batch_size ({train.batch_size}) must be divisible by train.accum_steps ({train.accum_steps}): "
            "every micro-batch holds the same number of rows",
        ),
        (
            data.frame_size == model.frame_size,
            f"data.frame_size ({data.frame_size}) must equal model.frame_size ({model.frame_size})",
        ),
        (
            data.num_frames <= model.max_frames,
            f"data.num_frames ({data.num_frames}) must be <= model.max_frames ({model.max_frames})",
        ),
        (
            cfg.loss.init_logit_scale <= cfg.loss.max_logit_scale,
            f"loss.init_logit_scale ({cfg.loss.init_logit_scale}) must be <= loss.max_logit_scale "
            f"({cfg.loss.max_logit_scale})",
        ),
        (
            model.width % model.heads == 0,
            f"model.width ({model.width}) must be divisible by model.heads ({model.heads})",
        ),
        (
            cfg.qa.fusion_width % cfg.qa.fusion_heads == 0,
            f"qa.fusion_width ({cfg.qa.fusion_width}) must be divisible by qa.fusion_heads ({cfg.qa.fusion_heads})",
        ),
        (
            data.format != "webdataset" or bool(data.urls.strip()),
            "data.format 'webdataset' needs data.urls (the shards of `mama shard`, e.g. shards/shard-{000000..000009}.tar)",
        ),
        (
            data.format != "webdataset" or data.meta_holdout == 0,
            "data.meta_holdout holds videos out of a training file; with data.format 'webdataset' set data.meta",
        ),
        (
            model.temporal != "seqTransf" or model.temporal_layers >= 1,
            f"model.temporal 'seqTransf' needs model.temporal_layers >= 1, got {model.temporal_layers}",
        ),
    ]
    if cfg.task == "retrieval":
        # A contrastive batch of one pair has no negative: its loss is 0 and nothing is learnt.
        pairs.append((train.batch_size >= 2, f"task 'retrieval' needs train.batch_size >= 2, got {train.batch_size}"))
        pairs.append(
            (
                not cfg.meta.enabled or cfg.meta.batch_size >= 2,
                f"task 'retrieval' with meta.enabled needs meta.batch_size >= 2, got {cfg.meta.batch_size}",
            )
        )
    for holds, message in pairs:
        if not holds:
            raise ConfigError(message)
    # Every split the run reads (train, val and test always; meta with meta weighting or as eval.split)
    # needs its file, so that a bad eval.split fails now and not after training.
    section, files, holdout = (
        ("data", data, data.meta_holdout) if cfg.task == "retrieval" else ("qa", cfg.qa, cfg.qa.meta_holdout)
    )
    for split in ("train", "val", "test"):
        if not getattr(files, split).strip():
            raise ConfigError(f"{section}.{split}: expected the {split} split's annotation file, got ''")
    if (cfg.meta.enabled or cfg.eval.split == "meta") and not files.meta.strip() and holdout <= 0:
        why = "meta.enabled" if cfg.meta.enabled else "eval.split 'meta'"
        raise ConfigError(
            f"{why} needs a meta split: set {section}.meta (an annotation file) or {section}.meta_holdout > 0"
        )


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; ".join(errors))
    if origin is Literal:
        allowed = typing.get_args(hint)
        # Compare types too: True == 1, but a bool is not an int here (as for plain int fields below).
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise ConfigError(f"{where}: expected one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(typing.cast("type[DataclassInstance]", hint), value, where)
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{where}: expected a finite number, got {value!r}") from None
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads "5e-4" (no dot) as a string.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected float, got {value!r}") from None
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint}")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    # str(): YAML also reads numbers, booleans and null as keys.
    unknown = sorted(map(str, set(data) - names))
    if unknown:
        path = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s): {', '.join(path + k for k in unknown)}; valid: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    out = cls(**kwargs)
    # Nested sections were range-checked by their own from_dict call (through _coerce).
    for f in dataclasses.fields(cls):
        check_value(f"{where}.{f.name}" if where else f.name, getattr(out, f.name))
    if isinstance(out, Config):
        check_consistency(out)
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def resumable_fields() -> set[str]:
    """Dotted names of the :class:`Config` fields declared with :func:`resumable`."""
    return set(_resumable(Config, ""))


def _resumable(cls: type, prefix: str) -> Iterator[str]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("resume"):
            yield prefix + f.name
        elif dataclasses.is_dataclass(hints[f.name]):
            yield from _resumable(hints[f.name], f"{prefix}{f.name}.")


def resume_changes(saved: dict[str, Any], current: Config) -> list[str]:
    """``"section.key: old -> new"`` for every non-resumable setting in which ``current`` differs from
    ``saved`` (a checkpoint's :func:`to_dict` config); [] when a resume may go ahead."""
    # Keys added to the config after the checkpoint was written take their defaults, which reproduce
    # the behaviour of the version that wrote it.
    return list(_changes(to_dict(from_dict(Config, saved)), current, ""))


def _changes(saved: dict[str, Any], current: Any, prefix: str) -> Iterator[str]:
    for f in dataclasses.fields(current):
        if f.metadata.get("resume"):
            continue
        value = getattr(current, f.name)
        if dataclasses.is_dataclass(value):
            yield from _changes(saved[f.name], value, f"{prefix}{f.name}.")
        elif saved[f.name] != value:
            yield f"{prefix}{f.name}: {saved[f.name]!r} -> {value!r}"


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_yaml(raw, f"override {item!r}")
    return data


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML: {exc}") from None
    except (ValueError, RecursionError) as exc:  # e.g. a date such as 2024-13-01
        raise ConfigError(f"{where}: invalid YAML value: {exc}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
        loaded = _parse_yaml(text, str(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = loaded or {}
    merged = _merge(to_dict(Config()), data, str(path or "config"))
    apply_overrides(merged, overrides or [])
    try:
        return from_dict(Config, merged)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None


def _merge(base: dict[str, Any], update: dict[str, Any], where: str) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, where)
        else:
            out[key] = value
    return out


def save_config(cfg: Config, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
