"""Property tests (Hypothesis) of the config loader: whatever the YAML file, the dotted overrides or a
checkpoint's config dict hold, ``load_config`` / ``from_dict`` return a config whose every setting is in
its range (mama.config.RULES, check_consistency), or raise ConfigError (naming the file when there is
one): never another exception.

The example budget is bounded (profile "ci": 80 examples per property, derandomised, a few seconds);
``MAMA_HYPOTHESIS_PROFILE=thorough`` searches 15x longer with fresh random examples.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mama.config import RULES, Config, ConfigError, check_consistency, from_dict, load_config, to_dict

settings.register_profile(
    "ci", max_examples=80, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=1200, deadline=None, database=None)
settings.load_profile(os.environ.get("MAMA_HYPOTHESIS_PROFILE", "ci"))

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def _dotted_names() -> list[str]:
    """Every setting's dotted name (``task``, ``train.steps`` ...)."""
    out = []
    for f in dataclasses.fields(Config):
        hint = typing.get_type_hints(Config)[f.name]
        if dataclasses.is_dataclass(hint):
            out += [f"{f.name}.{g.name}" for g in dataclasses.fields(hint)]
        else:
            out.append(f.name)
    return sorted(out)


DOTTED = _dotted_names()

# Values of any YAML type, and the edge values where ranges start: what a typo or a wrong type gives.
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["jsonl", "cpu", "cuda:0", "qa", "meta", "test", "human", "", "fp16", "cosine"])
)
# Numbers where ranges start and end (YAML writes the floats as .nan, .inf).
EDGE_NUMBERS = st.integers(-2, 4) | st.floats(-2, 4) | st.sampled_from([float("nan"), float("inf"), 10**30])
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def _assert_valid(cfg: Config) -> None:
    """Every setting within its rule, and the settings consistent (what load_config promises)."""
    data = to_dict(cfg)
    for name, rule in RULES.items():
        section, _, key = name.rpartition(".")
        value = data[section][key] if section else data[key]
        assert value is None or rule.ok(value), f"{name}={value!r} loaded although {rule.allowed}"
    check_consistency(cfg)


def _load_or_config_error(path: Path | None, overrides: list[str] | None = None) -> None:
    try:
        cfg = load_config(path, overrides)
    except ConfigError as err:
        if path is not None:
            assert str(err).startswith(f"{path}: ") or str(err).startswith("override "), err
        return
    _assert_valid(cfg)


@st.composite
def _config_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """A config mapping mostly of real keys with values of any type (and now and then an unknown key)."""
    names = draw(st.lists(st.sampled_from(DOTTED), max_size=6, unique=True))
    out: dict[str, Any] = {}
    for name in names:
        section, _, key = name.rpartition(".")
        node = out.setdefault(section, {}) if section else out
        if isinstance(node, dict):
            node[key] = draw(EDGE_NUMBERS | VALUES)
    if draw(st.integers(0, 9)) == 0:
        out[draw(st.text(max_size=6))] = draw(VALUES)
    return out


@given(content=st.binary(max_size=400))
def test_arbitrary_bytes_as_a_config_file(tmp_path_factory: pytest.TempPathFactory, content: bytes) -> None:
    path = tmp_path_factory.getbasetemp() / "bytes.yaml"
    path.write_bytes(content)
    _load_or_config_error(path)


@given(data=_config_dicts())
def test_type_confused_config_files(tmp_path_factory: pytest.TempPathFactory, data: dict[str, Any]) -> None:
    path = tmp_path_factory.getbasetemp() / "confused.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    _load_or_config_error(path)


@pytest.mark.parametrize("recipe", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_truncated_recipes(recipe: Path, tmp_path: Path) -> None:
    valid = recipe.read_bytes()
    path = tmp_path / recipe.name

    @settings(max_examples=25)
    @given(cut=st.integers(0, len(valid)))
    def check(cut: int) -> None:
        path.write_bytes(valid[:cut])
        _load_or_config_error(path)

    check()


@given(
    overrides=st.lists(
        st.one_of(
            st.tuples(
                st.sampled_from(DOTTED), VALUES.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip())
            ),
            st.tuples(st.sampled_from(DOTTED), st.text(max_size=15)),
            st.tuples(st.text(max_size=12), st.text(max_size=8)),
        ).map(lambda kv: f"{kv[0]}={kv[1]}")
        | st.text(max_size=20),
        max_size=4,
    )
)
def test_dotted_overrides(overrides: list[str]) -> None:
    _load_or_config_error(None, overrides)


@given(data=_config_dicts())
def test_checkpoint_config_dicts(data: dict[str, Any]) -> None:
    """``from_dict`` as resume and ``mama eval`` use it, on a saved config with type-confused values."""
    saved = to_dict(Config())
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(saved.get(key), dict):
            saved[key].update(value)
        else:
            saved[key] = value
    try:
        cfg = from_dict(Config, saved)
    except ConfigError:
        return
    _assert_valid(cfg)
