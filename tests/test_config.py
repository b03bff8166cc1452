from pathlib import Path

import pytest
import yaml

from mama.config import Config, ConfigError, load_config, save_config
from mama.data.datasets import DATASET_FORMATS
from mama.models import list_models
from mama.qa.datasets import QA_FORMATS

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
        None, ["optim.lr=5e-4", "loss.margin=0.05", "meta.enabled=true", "data.caption_sources=[human]", "train.out_dir=x/y"]
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
