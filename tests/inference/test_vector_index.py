"""The FAISS index behind `mama search` (mama.inference.vector_index), on synthetic unit vectors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from mama.inference.vector_index import AUTO_FLAT_MAX, INDEX_TYPES, IndexSpec, VectorIndex, resolve_spec


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n: int, dim: int, clusters: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) unit vectors around ``clusters`` random centres (cosine ~0.8 to their centre), and labels."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((clusters, dim)))
    labels = rng.integers(0, clusters, n)
    return _unit(centres[labels] + 0.75 / np.sqrt(dim) * rng.standard_normal((n, dim))), labels


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("num_queries", [1, 3, 40], ids=["one query", "a few (torch path)", "many (FAISS path)"])
def test_flat_search_equals_brute_force(num_queries: int) -> None:
    rng = np.random.default_rng(1)
    data = _unit(rng.standard_normal((3000, 32)))
    queries = _unit(rng.standard_normal((num_queries, 32)))
    scores, rows = VectorIndex.build(data, "flat").search(queries, 7)
    exact = torch.from_numpy(queries).double() @ torch.from_numpy(data).double().T  # (Q, N) in float64
    top = exact.topk(7, dim=1)
    assert rows.dtype == np.int64 and scores.dtype == np.float32 and rows.shape == (num_queries, 7)
    assert np.array_equal(rows, top.indices.numpy())
    np.testing.assert_allclose(scores, top.values.numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_the_right_neighbours_on_clustered_data(kind: str, tmp_path: Path) -> None:
    data, _ = _clustered(6000, 32, clusters=60)
    rng = np.random.default_rng(2)
    targets = rng.choice(len(data), 50, replace=False)
    queries = _unit(data[targets] + 0.02 * rng.standard_normal((50, 32)))  # near-copies of known rows
    index = VectorIndex.build(data, kind)
    if kind == "ivf":
        assert index.spec.params["nlist"] == 128  # 2 sqrt(6000) = 155 -> 2^7
    _, rows = index.search(queries, 10)
    assert np.array_equal(rows[:, 0], targets), "each query's own row is its best match"
    _, exact = VectorIndex.build(data, "flat").search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), exact.tolist(), strict=True)])
    assert recall >= 0.95
    index.save(tmp_path / "index.faiss")
    loaded = VectorIndex.load(tmp_path / "index.faiss", index.spec)
    assert np.array_equal(loaded.search(queries, 10)[1], rows)
    assert np.array_equal(loaded.reconstruct([0, 5999]), data[[0, 5999]])


def test_an_ivf_build_is_deterministic_and_its_search_parameters_matter(tmp_path: Path) -> None:
    """The same rows give the same bytes (appending to an index rebuilds it and must equal a one-go build)."""
    data, _ = _clustered(4000, 16, clusters=40, seed=3)
    for name in ("a", "b"):
        VectorIndex.build(data, "ivf", nlist=64, nprobe=1).save(tmp_path / name)
    assert _sha256(tmp_path / "a") == _sha256(tmp_path / "b")
    index = VectorIndex.load(tmp_path / "a", resolve_spec("ivf", len(data), nlist=64, nprobe=1))
    queries = _unit(np.random.default_rng(4).standard_normal((30, 16)))
    _, exact = VectorIndex.build(data, "flat").search(queries, 10)
    hits = [index.search(queries, 10, nprobe=nprobe)[1] for nprobe in (1, 64)]
    assert np.array_equal(hits[1], exact), "visiting every cell is exact"
    assert not np.array_equal(hits[0], exact), "one cell of 64 misses neighbours of random queries"


def test_resolve_spec_picks_by_size_and_refuses_bad_input() -> None:
    assert resolve_spec("auto", AUTO_FLAT_MAX) == IndexSpec("flat", {})
    assert resolve_spec("auto", AUTO_FLAT_MAX + 1).kind == "ivf"
    assert resolve_spec("ivf", 1_000_000).params == {"nlist": 2048, "nprobe": 16}
    assert resolve_spec("ivf", 100).params["nlist"] == 2  # at least 39 training rows per cell
    assert resolve_spec("hnsw", 10, ef_search=128).params["ef_search"] == 128
    with pytest.raises(ValueError, match="unknown index type 'annoy'"):
        resolve_spec("annoy", 10)
    with pytest.raises(ValueError, match="flat index takes no parameter nprobe"):
        resolve_spec("flat", 10, nprobe=4)
    with pytest.raises(ValueError, match="positive integers"):
        resolve_spec("ivf", 10_000, nprobe=0)
    for spec in (resolve_spec("flat", 5), resolve_spec("ivf", 10_000), resolve_spec("hnsw", 5)):
        assert IndexSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="expected"):
        IndexSpec.from_json({"type": "ivf", "metric": "inner_product", "params": {"nlist": 8}})


def test_search_arguments_are_checked_and_k_is_clamped() -> None:
    data = _unit(np.random.default_rng(5).standard_normal((5, 8)))
    index = VectorIndex.build(data, "flat")
    scores, rows = index.search(data[:2], 50)
    assert rows.shape == (2, 5) and np.array_equal(rows[:, 0], [0, 1]) and np.all(np.diff(scores, axis=1) <= 0)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(data[:1], 0)
    with pytest.raises(ValueError, match=r"queries: shape \(1, 4\), expected \(N, 8\)"):
        index.search(data[:1, :4], 3)
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full((1, 8), np.nan, np.float32), 3)
    with pytest.raises(ValueError, match="flat search takes no parameter nprobe"):
        index.search(data[:1], 3, nprobe=2)


def test_load_refuses_an_index_of_another_kind(tmp_path: Path) -> None:
    data = _unit(np.random.default_rng(6).standard_normal((200, 8)))
    VectorIndex.build(data, "flat").save(tmp_path / "flat.faiss")
    with pytest.raises(ValueError, match=r"flat.faiss: a IndexFlatIP, not the hnsw inner-product index"):
        VectorIndex.load(tmp_path / "flat.faiss", resolve_spec("hnsw", 200))
    (tmp_path / "junk.faiss").write_bytes(b"not an index")
    with pytest.raises(ValueError, match="junk.faiss: unreadable FAISS index"):
        VectorIndex.load(tmp_path / "junk.faiss", resolve_spec("flat", 200))


def test_the_cli_offers_the_index_types_of_the_library() -> None:
    from mama.cli import build_parser

    embed = build_parser()._subparsers._group_actions[0].choices["embed"]  # type: ignore[union-attr]
    option = next(a for a in embed._actions if a.dest == "index_type")
    assert tuple(option.choices) == INDEX_TYPES
