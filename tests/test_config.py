import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from mama.config import Config, ConfigError, load_config, resumable_fields, resume_changes, save_config, to_dict
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
