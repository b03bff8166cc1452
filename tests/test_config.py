import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from mama.config import (
    ANY_NUMBER,
    DATASET_FORMAT_NAMES,
    QA_FORMAT_NAMES,
    RULES,
    Config,
    ConfigError,
    ModelConfig,
    from_dict,
    load_config,
    resumable_fields,
    resume_changes,
    save_config,
    to_dict,
)
from mama.data.datasets import DATASET_FORMATS
from mama.data.qa_datasets import QA_FORMATS
from mama.models import list_models

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SHIPPED_CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def _write(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_defaults_load() -> None:
    assert load_config() == Config()
    assert load_config(None, []) == Config()


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", {"train": {"steps": 10, "batch_size": 8}, "loss": {"margin": 0.1}})
    cfg = load_config(path, ["train.steps=20", "meta.enabled=true"])
    assert cfg.train.steps == 20  # the override beats the file
    assert cfg.train.batch_size == 8  # the file beats the default
    assert cfg.loss.margin == 0.1
    assert cfg.meta.enabled is True
    assert cfg.optim == Config().optim  # untouched sections keep their defaults


@pytest.mark.parametrize(
    ("yaml_data", "overrides", "key"),
    [
        ({"train": {"stepz": 1}}, [], "train.stepz"),
        ({"bogus": 1}, [], "bogus"),
        (None, ["model.nope=3"], "model.nope"),
        (None, ["bogus.x=1"], "bogus"),
    ],
)
def test_unknown_key_names_dotted_path(tmp_path: Path, yaml_data: object, overrides: list[str], key: str) -> None:
    path = None if yaml_data is None else _write(tmp_path / "c.yaml", yaml_data)
    with pytest.raises(ConfigError, match=rf"unknown config key\(s\): {key}\b"):
        load_config(path, overrides)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.steps=abc", "train.steps"),
        ("train.steps=1.5", "train.steps"),
        ("train.steps=true", "train.steps"),  # bool is not an int here, although Python says it is
        ("train.progress=maybe", "train.progress"),
        ("optim.lr=fast", "optim.lr"),
        ("data.caption_sources=human", "data.caption_sources"),
        ("data.caption_sources=[1]", r"data.caption_sources\[0\]"),
        ("model=3", "model"),
    ],
)
def test_wrong_type_raises(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}: expected"):
        load_config(None, [override])


def test_float_coercions(tmp_path: Path) -> None:
    # YAML 1.1 reads 5e-4 (no dot) as a string; the loader still makes it a float.
    path = _write(tmp_path / "c.yaml", "optim:\n  lr: 5e-4\nloss:\n  margin: 1\n")
    cfg = load_config(path, ["meta.lr=2e-3"])
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.loss.margin == 1.0 and isinstance(cfg.loss.margin, float)
    assert cfg.meta.lr == 2e-3


def test_list_overrides() -> None:
    cfg = load_config(None, ["data.caption_sources=[human]", "meta.virtual_params=[model.video, model.text]"])
    assert cfg.data.caption_sources == ["human"]
    assert cfg.meta.virtual_params == ["model.video", "model.text"]
    assert load_config(None, ["meta.virtual_params=[]"]).meta.virtual_params == []


@pytest.mark.parametrize("bad", ["train.steps", "=3", "train.steps.x=1"])
def test_malformed_override(bad: str) -> None:
    with pytest.raises(ConfigError):
        load_config(None, [bad])


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(_write(tmp_path / "broken.yaml", "train: [1, 2\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    assert load_config(_write(tmp_path / "empty.yaml", "")) == Config()


def test_save_load_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        ["optim.lr=5e-4", "loss.margin=0.05", "meta.enabled=true", "data.caption_sources=[human]", "train.out_dir=x/y"],
    )
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg


def test_configs_folder_is_not_empty() -> None:
    assert SHIPPED_CONFIGS, f"no *.yaml in {CONFIG_DIR}: the config test below would check nothing"


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    # Invariants only checked once data or a model is built; a shipped config must not fail there.
    assert cfg.model.name in list_models()
    assert cfg.data.frame_size == cfg.model.frame_size
    assert cfg.data.num_frames <= cfg.model.max_frames
    assert cfg.data.format in DATASET_FORMATS
    assert cfg.task in ("retrieval", "qa")
    if cfg.task == "qa":
        assert cfg.qa.format in QA_FORMATS and cfg.qa.answer_format in ("open", "mc")
        head = "model.open_head" if cfg.qa.answer_format == "open" else "model.mc_head"
        assert not cfg.meta.enabled or head in cfg.meta.virtual_params, "the virtual step must reach the answer head"
    assert cfg.data.decode in ("cache", "stream")
    if cfg.data.format != "jsonl":
        assert not cfg.data.synthvl and cfg.data.videos, "a benchmark recipe names its videos folder"
        assert cfg.data.meta or cfg.data.meta_holdout > 0 or not cfg.meta.enabled


def _literal_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted name, type hint, default) of every field whose type is or contains a Literal."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += _literal_fields(hint, f"{prefix}{f.name}.")
        elif Literal in (typing.get_origin(hint), *map(typing.get_origin, typing.get_args(hint))):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            out.append((prefix + f.name, hint, default))
    return out


LITERAL_FIELDS = _literal_fields()


def test_enum_like_fields_are_literals() -> None:
    names = {name for name, _, _ in LITERAL_FIELDS}
    assert names == {
        "data.decode", "loss.mode", "meta.optimizer", "meta.method", "optim.schedule", "train.precision",
        "train.loggers", "eval.split", "qa.answer_format", "model.temporal", "task",
    }  # fmt: skip


@pytest.mark.parametrize(("name", "hint", "default"), LITERAL_FIELDS, ids=[name for name, _, _ in LITERAL_FIELDS])
def test_literal_defaults_are_allowed(name: str, hint: Any, default: Any) -> None:
    if typing.get_origin(hint) is list:
        (hint,) = typing.get_args(hint)
        assert default, name
    else:
        default = [default]
    assert all(value in typing.get_args(hint) for value in default), name


def test_bad_literal_in_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", {"optim": {"schedule": "linear"}})
    with pytest.raises(ConfigError, match=r"optim\.schedule: expected one of 'cosine', 'constant', got 'linear'$"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.precision=fp64", r"^train\.precision: expected one of 'fp32', 'bf16', 'fp16', got 'fp64'$"),
        ("task=captioning", r"^task: expected one of 'retrieval', 'qa', got 'captioning'$"),
        ("meta.method=second_order", r"^meta\.method: expected one of 'exact', 'first_order', got 'second_order'$"),
        (
            "model.temporal=meanp",
            r"^model\.temporal: expected one of 'meanP', 'seqTransf', got 'meanp'$",
        ),  # case matters
        ("data.decode=true", r"^data\.decode: expected one of 'cache', 'stream', got True$"),
    ],
)
def test_bad_literal_in_override(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_literal_list_checks_each_item() -> None:
    assert Config().train.loggers == ["jsonl"]
    assert load_config(None, ["train.loggers=[jsonl, tensorboard]"]).train.loggers == ["jsonl", "tensorboard"]
    assert load_config(None, ["train.loggers=[]"]).train.loggers == []
    with pytest.raises(
        ConfigError, match=r"^train\.loggers\[1\]: expected one of 'jsonl', 'tensorboard', got 'wandb'$"
    ):
        load_config(None, ["train.loggers=[jsonl, wandb]"])
    with pytest.raises(ConfigError, match=r"^train\.loggers: expected a list"):
        load_config(None, ["train.loggers=jsonl"])


def test_valid_literals_load(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", {"task": "qa", "qa": {"answer_format": "mc"}, "optim": {"schedule": "constant"}})
    cfg = load_config(path, ["train.precision=bf16", "meta.method=first_order", "eval.split=val"])
    assert (cfg.task, cfg.qa.answer_format, cfg.optim.schedule) == ("qa", "mc", "constant")
    assert (cfg.train.precision, cfg.meta.method, cfg.eval.split) == ("bf16", "first_order", "val")


# What a resume may change: logging, speed and where things go, never what is trained. Pinned so that a
# new field is resumable only by a deliberate change here too.
RESUMABLE = {
    "train.progress", "train.overwrite", "train.log_every", "train.eval_every", "train.checkpoint_every",
    "train.keep_last", "train.log_weights_every", "train.threads", "train.out_dir", "train.accum_steps",
    "train.device", "train.loggers", "data.workers", "eval.dsl", "eval.batch_size", "eval.chunk_size",
    "data.urls", "data.manifest",  # where the shards are; the checkpoint's data position checks the data itself
}  # fmt: skip


def test_resumable_fields_are_pinned() -> None:
    assert resumable_fields() == RESUMABLE


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.log_every=5"],
        ["data.workers=4"],
        ["eval.dsl=true"],
        ["train.loggers=[jsonl, tensorboard]", "train.out_dir=elsewhere", "train.accum_steps=4", "eval.batch_size=8"],
    ],
)
def test_resume_allows_resumable_changes(overrides: list[str]) -> None:
    assert resume_changes(to_dict(Config()), load_config(None, overrides)) == []


def test_resume_names_other_changes() -> None:
    saved = to_dict(load_config(None, ["loss.margin=0.1"]))
    assert resume_changes(saved, load_config(None, ["loss.margin=0.2"])) == ["loss.margin: 0.1 -> 0.2"]
    current = load_config(None, ["loss.margin=0.1", "task=qa", "train.log_every=1", "data.caption_sources=[human]"])
    assert resume_changes(saved, current) == [
        "data.caption_sources: ['human', 'lvlm'] -> ['human']",
        "task: 'retrieval' -> 'qa'",
    ]


def test_resume_from_older_config_missing_newer_keys() -> None:
    saved = to_dict(Config())
    del saved["train"]["loggers"], saved["meta"]["method"]
    assert resume_changes(saved, Config()) == []
    # A non-default value against a missing key (which means its default) is a change.
    assert resume_changes(saved, load_config(None, ["meta.method=first_order"])) == [
        "meta.method: 'exact' -> 'first_order'"
    ]


def test_resume_rejects_unknown_saved_keys() -> None:
    saved = to_dict(Config())
    saved["train"]["removed_setting"] = 1
    with pytest.raises(ConfigError, match=r"train\.removed_setting"):
        resume_changes(saved, Config())


# ---------------------------------------------------------------------------------------------------
# Range checks at load (mama.config.RULES and check_consistency)


def _leaf_settings(cls: type = Config, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted name, type hint) of every setting that is not a section."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += _leaf_settings(typing.cast(type, hint), f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, hint))
    return out


def _base_types(hint: Any) -> set[Any]:
    """The plain types a hint is made of: ``float | None`` -> {float, None}, ``list[str]`` -> {str}."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return {Literal}
    if origin is not None:
        return set().union(*(_base_types(arg) for arg in typing.get_args(hint)))
    return {None if hint is type(None) else hint}


SETTINGS = _leaf_settings()
# Every number, and every string whose values are not fixed by a Literal type, needs a declared rule.
NEEDS_RULE = [name for name, hint in SETTINGS if _base_types(hint) & {int, float, str}]
NUMERIC = [name for name, hint in SETTINGS if _base_types(hint) & {int, float}]


def test_every_numeric_and_string_setting_has_a_rule() -> None:
    missing = sorted(set(NEEDS_RULE) - set(RULES))
    assert not missing, f"declare the allowed values of {missing} in mama.config.RULES"
    stale = sorted(set(RULES) - {name for name, _ in SETTINGS})
    assert not stale, f"mama.config.RULES names settings that do not exist: {stale}"
    assert "train.batch_size" in NUMERIC and "optim.backbone_lr" in NUMERIC and "data.format" in NEEDS_RULE


def test_format_rules_list_the_readers() -> None:
    assert set(DATASET_FORMAT_NAMES) == set(DATASET_FORMATS)
    assert set(QA_FORMAT_NAMES) == set(QA_FORMATS)


def _rejected_value(name: str) -> Any:
    """A value the setting's rule refuses, preferring zero and negatives (where runs used to break)."""
    rule = RULES[name]
    for value in (-1, 0, -0.5, 0.5, 1, 2, 10**9):
        if not rule.ok(value):
            return value
    return None


@pytest.mark.parametrize("name", NUMERIC)
def test_numeric_setting_out_of_range_fails_at_load_naming_key_value_and_range(name: str) -> None:
    value = _rejected_value(name)
    if value is None:
        assert RULES[name] is ANY_NUMBER, f"{name}: a rule that allows every number should be ANY_NUMBER"
    else:
        # A float setting reads -1 as -1.0.
        message = rf"^{re.escape(name)}: expected {re.escape(RULES[name].allowed)}, got {value!r}(\.0)?$"
        with pytest.raises(ConfigError, match=message):
            load_config(None, [f"{name}={value}"])
    if float in _base_types(dict(SETTINGS)[name]):
        with pytest.raises(ConfigError, match=rf"^{re.escape(name)}: expected a finite number, got nan$"):
            load_config(None, [f"{name}=.nan"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # Each failed deep inside the first steps, ran to completion on a meaningless value, or (eval.*)
        # failed only after the whole training had run.
        ("train.steps=0", r"^train\.steps: expected >= 1, got 0$"),
        ("train.batch_size=0", r"^train\.batch_size: expected >= 1, got 0$"),
        ("train.log_every=0", r"^train\.log_every: expected >= 1, got 0$"),
        ("train.keep_last=0", r"^train\.keep_last: expected >= 1, got 0$"),
        ("data.num_frames=0", r"^data\.num_frames: expected >= 1, got 0$"),
        ("data.cached_frames=-1", r"^data\.cached_frames: expected >= 0, got -1$"),
        ("model.heads=0", r"^model\.heads: expected >= 1, got 0$"),
        ("model.embed_dim=0", r"^model\.embed_dim: expected >= 1, got 0$"),
        ("optim.eps=0", r"^optim\.eps: expected > 0, got 0\.0$"),
        ("optim.warmup_frac=1", r"^optim\.warmup_frac: expected in \[0, 1\), got 1\.0$"),
        ("loss.margin=1.6", r"^loss\.margin: expected in \[0, pi/2\), got 1\.6$"),
        ("meta.virtual_lr=0", r"^meta\.virtual_lr: expected > 0, got 0\.0$"),
        ("eval.batch_size=0", r"^eval\.batch_size: expected >= 1, got 0$"),
        ("eval.chunk_size=0", r"^eval\.chunk_size: expected >= 1, got 0$"),
        ("data.format=webvid", r"^data\.format: expected one of 'jsonl', .*'lsmdc', got 'webvid'$"),
        ("qa.format=msrvtt", r"^qa\.format: expected one of 'jsonl', .*, got 'msrvtt'$"),
        ("train.device=gpu", r"^train\.device: expected 'auto', 'cpu', .*, got 'gpu'$"),
        ("data.caption_sources=[]", r"^data\.caption_sources: expected a non-empty list"),
        ("data.caption_sources=[human, web]", r"^data\.caption_sources: expected a non-empty list"),
        ("train.out_dir=''", r"^train\.out_dir: expected a non-empty string, got ''$"),
        ("train.seed=-1", r"^train\.seed: expected >= 0 and < 2\*\*63, got -1$"),
    ],
)
def test_bad_settings_fail_at_load(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_bad_value_in_a_file_names_the_file_and_the_key(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", {"train": {"batch_size": -4}})
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: train\.batch_size: expected >= 1, got -4$"):
        load_config(path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.batch_size=10", "train.accum_steps=3"], r"train\.batch_size \(10\) must be divisible by train\.accum"),
        (["data.frame_size=16"], r"data\.frame_size \(16\) must equal model\.frame_size \(32\)"),
        (["data.num_frames=9", "model.max_frames=8"], r"data\.num_frames \(9\) must be <= model\.max_frames \(8\)"),
        (
            ["loss.init_logit_scale=6", "loss.max_logit_scale=1"],
            r"loss\.init_logit_scale \(6\.0\) must be <= loss\.max",
        ),
        (["model.heads=3"], r"model\.width \(128\) must be divisible by model\.heads \(3\)"),
        (["qa.fusion_heads=3"], r"qa\.fusion_width \(256\) must be divisible by qa\.fusion_heads \(3\)"),
        (["model.temporal=seqTransf", "model.temporal_layers=0"], r"seqTransf' needs model\.temporal_layers >= 1"),
        (["train.batch_size=1"], r"task 'retrieval' needs train\.batch_size >= 2, got 1"),
        (["meta.enabled=true", "meta.batch_size=1"], r"meta\.enabled needs meta\.batch_size >= 2, got 1"),
        (["data.test=''"], r"^data\.test: expected the test split's annotation file"),
        (["task=qa", "qa.val=''"], r"^qa\.val: expected the val split's annotation file"),
        (
            ["eval.split=meta", "data.meta=''"],
            r"^eval\.split 'meta' needs a meta split: set data\.meta .* data\.meta_holdout",
        ),
        (["meta.enabled=true", "data.meta=''"], r"^meta\.enabled needs a meta split"),
        (["task=qa", "eval.split=meta", "qa.meta=''"], r"set qa\.meta \(an annotation file\) or qa\.meta_holdout > 0"),
    ],
)
def test_settings_that_do_not_fit_together_fail_at_load(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_consistent_edge_values_load() -> None:
    cfg = load_config(
        None,
        [
            "meta.enabled=true",
            "data.meta=''",
            "data.meta_holdout=10",
            "eval.split=meta",
            "task=qa",
            "train.batch_size=1",
        ],
    )
    assert cfg.data.meta_holdout == 10 and cfg.train.batch_size == 1  # QA learns from a batch of one
    cfg = load_config(None, ["optim.backbone_lr=0", "optim.grad_clip=0", "optim.warmup_frac=0", "loss.margin=0"])
    assert cfg.optim.backbone_lr == 0.0  # a frozen backbone
    assert load_config(None, ["train.device=cuda:1"]).train.device == "cuda:1"


def test_checkpoint_and_model_folder_configs_are_checked_too() -> None:
    saved = to_dict(Config())
    saved["eval"]["chunk_size"] = 0
    with pytest.raises(ConfigError, match=r"^eval\.chunk_size: expected >= 1, got 0$"):
        from_dict(Config, saved)
    with pytest.raises(ConfigError, match=r"^eval\.chunk_size"):
        resume_changes(saved, Config())
    with pytest.raises(ConfigError, match=r"^model\.heads: expected >= 1, got 0$"):
        from_dict(ModelConfig, {"heads": 0}, "model")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"train:\n  steps: 1\xff\n", "not UTF-8"),
        (b"1: 2\ntrain: {}\n", r"unknown config key\(s\): 1;"),
        (b"train:\n  null: 3\n", r"unknown config key\(s\): train\.None;"),
        (b"train:\n  steps: 2024-13-01\n", "invalid YAML value: month must be in 1..12"),
        (b"optim:\n  lr: " + b"1" * 400 + b"\n", r"optim\.lr: expected a finite number"),
    ],
)
def test_unreadable_or_odd_yaml_is_a_config_error_naming_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: ")
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path)  # a folder


@pytest.mark.parametrize("override", ["train.steps=[", "train.steps=2024-13-01", "optim.lr=" + "9" * 400])
def test_unparseable_override_values_are_config_errors(override: str) -> None:
    with pytest.raises(ConfigError):
        load_config(None, [override])


def test_webdataset_settings_are_checked() -> None:
    """data.format webdataset needs data.urls and a meta file; split_format and shuffle_buffer are checked."""
    cfg = load_config(
        None, ["data.format=webdataset", "data.urls=s/shard-{000000..000003}.tar", "data.split_format=msrvtt"]
    )
    assert (cfg.data.urls, cfg.data.split_format, cfg.data.shuffle_buffer) == (
        "s/shard-{000000..000003}.tar",
        "msrvtt",
        256,
    )
    with pytest.raises(ConfigError, match="needs data.urls"):
        load_config(None, ["data.format=webdataset"])
    with pytest.raises(ConfigError, match="data.meta_holdout"):
        load_config(None, ["data.format=webdataset", "data.urls=a.tar", "data.meta=''", "data.meta_holdout=10"])
    with pytest.raises(ConfigError, match=r"^data\.split_format"):
        load_config(None, ["data.split_format=webdataset"])
    with pytest.raises(ConfigError, match=r"^data\.shuffle_buffer"):
        load_config(None, ["data.shuffle_buffer=-1"])
