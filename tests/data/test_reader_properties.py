"""Property tests (Hypothesis) of every annotation reader on damaged annotation files.

Each reader gets a small valid dataset in its real layout (tests/data/annotation_fixtures.py); then one of
its files is replaced by arbitrary bytes, a truncation, a copy with one byte changed, or (by the file's
kind) type-confused JSON, a type-confused pickle or CSV / text with a cell replaced or removed. Whatever
comes in, a reader returns records or raises AnnotationError whose message starts with one of its files
(FileNotFoundError for a file the damaged one names that does not exist): never another exception from
deep inside.

The example budget is bounded (profile "ci": 60 examples per file, derandomised, about 10 s for the
module); ``MAMA_HYPOTHESIS_PROFILE=thorough`` searches 20x longer with fresh random examples.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import pickle
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from annotation_fixtures import CASES, Case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mama.data.records import AnnotationError

settings.register_profile(
    "ci", max_examples=60, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=1200, deadline=None, database=None)
settings.load_profile(os.environ.get("MAMA_HYPOTHESIS_PROFILE", "ci"))

# Values of any JSON type, nested a little: what a wrong field, a wrong row or a wrong document holds.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)


def _node_paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path (keys and indices) of every node of a JSON-like tree, the root's () included."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _node_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _node_paths(value, (*prefix, i))


@st.composite
def _confused(draw: st.DrawFn, tree: Any) -> Any:
    """``tree`` with one node replaced by a value of any type, or removed (a missing field or row)."""
    tree = copy.deepcopy(tree)
    path = draw(st.sampled_from(list(_node_paths(tree))))
    if not path:
        return draw(JSON_VALUES)
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    if draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(JSON_VALUES)
    return tree


def _jsonl(rows: Any) -> bytes:
    rows = rows if isinstance(rows, list) else [rows]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def _rows(data: bytes, kind: str) -> list[list[str]]:
    text = data.decode("utf-8")
    if kind == "csv":
        return [list(row) for row in csv.reader(io.StringIO(text, newline=""))]
    return [line.split("\t") if kind == "tsv" else [line] for line in text.split("\n")]


def _unrows(rows: list[list[str]], kind: str) -> bytes:
    if kind == "csv":
        out = io.StringIO()
        csv.writer(out).writerows(rows)
        return out.getvalue().encode()
    return "\n".join(("\t" if kind == "tsv" else "").join(row) for row in rows).encode()


@st.composite
def _confused_cells(draw: st.DrawFn, data: bytes, kind: str) -> bytes:
    """A CSV, TSV or text file with one cell (line) replaced by any text, or removed."""
    rows = _rows(data, kind)
    r = draw(st.integers(0, len(rows) - 1))
    if rows[r] and draw(st.booleans()):
        del rows[r][draw(st.integers(0, len(rows[r]) - 1))]
    elif rows[r]:
        rows[r][draw(st.integers(0, len(rows[r]) - 1))] = draw(st.text(max_size=20))
    return _unrows(rows, kind)


def damaged(valid: bytes, kind: str) -> st.SearchStrategy[bytes]:
    """Damaged versions of the file ``valid`` of the given kind (see :class:`Case`)."""
    options = [
        st.binary(max_size=300),
        st.integers(0, len(valid)).map(lambda n: valid[:n]),
        st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)).map(
            lambda at: valid[: at[0]] + bytes([at[1]]) + valid[at[0] + 1 :]
        ),
    ]
    if kind == "json":
        options.append(_confused(json.loads(valid)).map(lambda tree: json.dumps(tree).encode()))
    elif kind == "jsonl":
        rows = [json.loads(line) for line in valid.decode().splitlines() if line.strip()]
        options.append(_confused(rows).map(_jsonl))
    elif kind == "pickle":
        # The test's own fixture: a trusted pickle.
        options.append(_confused(pickle.loads(valid)).map(lambda tree: pickle.dumps(tree, protocol=2)))
        options.append(JSON_VALUES.map(lambda tree: pickle.dumps(tree)))
    else:
        options.append(_confused_cells(valid, kind))
    return st.one_of(options)


def _read_or_documented_error(case: Case, root: Path) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # blank captions, duplicate ids in the index: warned, not raised
            case.read()
    except AnnotationError as err:
        assert any(str(err).startswith(f"{path}:") for path, _ in case.files), err
    except FileNotFoundError as err:
        assert str(root) in str(err), err


def _targets() -> list[tuple[str, int]]:
    """(case, index of one of its files) for every annotation file of every reader."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in sorted(CASES.items()):
            case = build(Path(tmp) / name)
            out += [(name, index) for index in range(min(len(case.files), 3))]  # Causal-VidQA: one video's files
    return out


@pytest.mark.parametrize(("name", "index"), _targets())
def test_reader_survives_a_damaged_file(name: str, index: int, tmp_path: Path) -> None:
    case = CASES[name](tmp_path)
    path, kind = case.files[index]
    valid = path.read_bytes()

    @given(content=damaged(valid, kind))
    def check(content: bytes) -> None:
        path.write_bytes(content)
        _read_or_documented_error(case, tmp_path)

    check()
