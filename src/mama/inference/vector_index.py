"""Nearest-neighbour search over L2-normalised embeddings with FAISS (inner product = cosine similarity).

    index = VectorIndex.build(video_emb, "auto")       # (N, D) float32, L2-normalised rows
    scores, rows = index.search(query_emb, k=10)      # (Q, D) -> (Q, k) float32 scores, (Q, k) int64 rows
    index.save("videos.faiss"); index = VectorIndex.load("videos.faiss", index.spec)

Three kinds of index (``benchmarks/search.py`` measures them side by side):

- ``flat`` (``IndexFlatIP``): exact, every query scans every row; memory N x D x 4 bytes. A single
  query reads the whole matrix, so its latency grows with N: about 14 ms at 20k x 512 and 0.3-1.2 s at
  1M x 512 (p50) on two busy cores.
- ``ivf`` (``IndexIVFFlat``): k-means splits the rows into ``nlist`` cells (about 2 sqrt(N), a power
  of two); a query scans the ``nprobe`` cells nearest to it. Exact distances inside the cells, memory as
  flat plus the centroids. The build is deterministic (seeded k-means on a seeded sample), so the same
  rows give the same bytes.
- ``hnsw`` (``IndexHNSWFlat``): a navigable small-world graph, ``m`` links per node, ``ef_search``
  candidates per query. The fastest queries but a slow build, about N x m x 8 bytes more memory, and
  a build with several threads is not guaranteed byte-reproducible (FAISS inserts nodes in parallel).

``auto`` picks ``flat`` up to :data:`AUTO_FLAT_MAX` rows (exact, and a query still costs little) and
``ivf`` above. Measured on 1M x 512 clustered vectors (4096 gaussian clusters; benchmarks/search.py, two
busy cores, one thread per query): IVF (2048 cells) answered a query in 1.4-3.1 ms p50, 1.9-3.7 ms
p95 at nprobe 4-16 with recall@10 1.0, and built in 132 s; HNSW (M=32) answered in 0.4-0.7 ms but
found only 0.73-0.78 of the true top 10 at efSearch 32-128 (its graph links clusters poorly) and took
539 s to build; exact search took 0.3-1.2 s. On looser clusters IVF at nprobe 16 still found 0.994.

Rows are FAISS labels: ``rows[q, j]`` is the row number (0-based, in the order vectors were added) of
the j-th best match of query q; -1 (score -inf) pads a result when an approximate index finds fewer
than k rows in the cells or graph nodes it visits.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from tqdm.auto import tqdm

__all__ = ["AUTO_FLAT_MAX", "INDEX_TYPES", "IndexSpec", "VectorIndex", "faiss_version", "resolve_spec"]

INDEX_TYPES = ("auto", "flat", "ivf", "hnsw")
# Largest collection ``auto`` searches exactly. A flat query reads all N x D x 4 bytes: at 50k x 512
# (100 MB) it took 14 ms p50 and 16 ms p95 on two busy cores, above the 10 ms a query we aim for, while
# IVF there took 0.5 ms p50 at recall@10 1.0 (benchmarks/search.py); latency grows linearly with N, so
# up to ~30k exact search stays near 10 ms, and an IVF below that would have few rows per cell to train.
AUTO_FLAT_MAX = 30_000
# IVF: k-means on at most this many rows per cell (FAISS warns below 39; its default, 256, would make
# training on 1M rows four times longer) and this many iterations.
IVF_TRAIN_ROWS_PER_CELL = 64
IVF_TRAIN_ITERATIONS = 10
IVF_SEED = 1234
# Cells visited per query. At 1M x 512 (benchmarks/search.py, one thread): recall@10 1.0 from nprobe 4
# on clustered vectors; on looser ones (--point-cosine 0.5 --query-cosine 0.4) 0.986 / 0.994 / 0.997 at
# nprobe 8 / 16 / 32, with p95 3.4 / 5.7 / 7.5 ms. 16 meets recall 0.95 with a margin inside 10 ms.
IVF_NPROBE = 16
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40  # FAISS's default
HNSW_EF_SEARCH = 64
# FAISS computes flat scores with a BLAS matrix product only from this many queries on (default 20);
# below it, a per-row loop that is ~10x slower for one query over many rows.
_BLAS_THRESHOLD = 1
# Searches of fewer queries than this run on one FAISS thread. FAISS splits IVF and HNSW searches by
# query, so extra threads only wait: single IVF queries over 1M rows took 3.1 ms p50 / 3.7 ms p95 on one
# thread and 7.5 / 13 ms on two, on two busy cores (OpenMP threads spin-wait; benchmarks/search.py).
# A flat search of fewer queries is a torch matrix product instead (VectorIndex._search_flat_few).
PARALLEL_MIN_QUERIES = 16
_ADD_CHUNK = 65_536  # rows added at once, for the progress bar; adding in chunks gives the same index


@dataclass(frozen=True)
class IndexSpec:
    """What an index is: ``kind`` in ("flat", "ivf", "hnsw") and its parameters.

    ``params``: ivf ``{"nlist", "nprobe"}``; hnsw ``{"m", "ef_construction", "ef_search"}``; flat ``{}``.
    """

    kind: str
    params: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.kind, "metric": "inner_product", "params": dict(self.params)}

    @classmethod
    def from_json(cls, record: Any) -> IndexSpec:
        """The spec a manifest recorded; ValueError on anything else."""
        if (
            not isinstance(record, dict)
            or record.get("type") not in INDEX_TYPES[1:]
            or record.get("metric") != "inner_product"
            or not isinstance(record.get("params"), dict)
            or not all(isinstance(v, int) and v > 0 for v in record["params"].values())
        ):
            raise ValueError(f"not a vector index spec: {record!r}")
        spec = cls(record["type"], dict(record["params"]))
        expected = set(resolve_spec(spec.kind, 1).params)
        if set(spec.params) != expected:
            raise ValueError(f"{spec.kind} index parameters {sorted(spec.params)}, expected {sorted(expected)}")
        return spec


def resolve_spec(index_type: str, num_vectors: int, **params: int) -> IndexSpec:
    """The index to build for ``num_vectors`` rows: ``index_type`` in :data:`INDEX_TYPES`, defaults for
    any parameter not in ``params`` (``nlist``, ``nprobe``; ``m``, ``ef_construction``, ``ef_search``)."""
    if index_type not in INDEX_TYPES:
        raise ValueError(f"unknown index type {index_type!r}: expected one of {', '.join(INDEX_TYPES)}")
    if index_type == "auto":
        index_type = "flat" if num_vectors <= AUTO_FLAT_MAX else "ivf"
    if index_type == "flat":
        defaults: dict[str, int] = {}
    elif index_type == "ivf":
        # About 2 sqrt(N) cells as a power of two (2048 at 1M: a query at nprobe 16 scans ~8k rows), but
        # never fewer than 39 training rows per cell.
        nlist = 2 ** round(math.log2(max(1.0, 2 * math.sqrt(num_vectors))))
        nlist = max(1, min(nlist, num_vectors // 39))
        defaults = {"nlist": nlist, "nprobe": min(IVF_NPROBE, nlist)}
    else:
        defaults = {"m": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH}
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(f"{index_type} index takes no parameter {', '.join(sorted(unknown))}")
    bad = {k: v for k, v in params.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        raise ValueError(f"index parameters must be positive integers, got {bad}")
    return IndexSpec(index_type, {**defaults, **params})


def _faiss() -> Any:
    """The faiss module, imported on first use (``mama search --help`` must not pay for it)."""
    import faiss

    faiss.cvar.distance_compute_blas_threshold = _BLAS_THRESHOLD
    return faiss


def faiss_version() -> str:
    return str(_faiss().__version__)


@contextmanager
def _faiss_threads(threads: int | None) -> Iterator[None]:
    """Run FAISS with ``threads`` OpenMP threads inside the block (None: leave its setting alone)."""
    if threads is None:
        yield
        return
    faiss = _faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _as_rows(x: ArrayLike, dim: int | None, what: str) -> NDArray[np.float32]:
    """``x`` as a C-contiguous (N, dim) float32 array (a CPU torch tensor works, without a copy)."""
    arr = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if arr.ndim != 2 or (dim is not None and arr.shape[1] != dim):
        raise ValueError(f"{what}: shape {arr.shape}, expected (N, {dim if dim is not None else 'D'})")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: holds NaN or infinite values")
    return arr


class VectorIndex:
    """A FAISS inner-product index over (N, D) float32 rows, labelled 0..N-1 in the order added."""

    def __init__(self, index: Any, spec: IndexSpec) -> None:
        self.index = index
        self.spec = spec

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def empty(cls, spec: IndexSpec, dim: int) -> VectorIndex:
        """An untrained, empty index of ``spec`` for ``dim``-wide rows."""
        faiss = _faiss()
        p = spec.params
        if spec.kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif spec.kind == "ivf":
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, p["nlist"], faiss.METRIC_INNER_PRODUCT)
            index.nprobe = p["nprobe"]
        elif spec.kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, p["m"], faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = p["ef_construction"]
            index.hnsw.efSearch = p["ef_search"]
        else:
            raise ValueError(f"unknown index type {spec.kind!r}")
        return cls(index, spec)

    @classmethod
    def build(
        cls, vectors: ArrayLike, index_type: str | IndexSpec = "auto", progress: bool = False, **params: int
    ) -> VectorIndex:
        """An index of ``vectors`` (N, D) float32, L2-normalised rows; ``index_type`` as in
        :func:`resolve_spec` (or a resolved spec). An IVF index is trained on a seeded sample first."""
        rows = _as_rows(vectors, None, "vectors to index")
        spec = index_type if isinstance(index_type, IndexSpec) else resolve_spec(index_type, len(rows), **params)
        built = cls.empty(spec, rows.shape[1])
        if spec.kind == "ivf":
            built._train_ivf(rows)
        built.add(rows, progress=progress)
        return built

    def _train_ivf(self, rows: NDArray[np.float32]) -> None:
        faiss = _faiss()
        nlist = self.spec.params["nlist"]
        if len(rows) < nlist:
            raise ValueError(f"an IVF index of {nlist} cells needs at least {nlist} rows to train, got {len(rows)}")
        # A seeded sample and seeded k-means (not FAISS's own subsampling inside train) so that the same
        # rows always give the same centroids, whatever the thread count.
        sample_size = min(len(rows), nlist * IVF_TRAIN_ROWS_PER_CELL)
        sample = rows
        if sample_size < len(rows):
            pick = np.sort(np.random.default_rng(IVF_SEED).choice(len(rows), sample_size, replace=False))
            sample = rows[pick]
        kmeans = faiss.Clustering(self.dim, nlist)
        kmeans.niter = IVF_TRAIN_ITERATIONS
        kmeans.seed = IVF_SEED
        kmeans.spherical = True  # centroids of unit vectors, renormalised: cells by cosine
        kmeans.max_points_per_centroid = IVF_TRAIN_ROWS_PER_CELL
        kmeans.verbose = False
        quantizer = self.index.quantizer
        kmeans.train(sample, quantizer)
        self.index.is_trained = True

    def add(self, vectors: ArrayLike, progress: bool = False) -> None:
        """Append rows (M, D) float32, labelled len(self) .. len(self) + M - 1. An IVF index keeps its
        cells: rows added later are assigned to centroids trained without them."""
        rows = _as_rows(vectors, self.dim, "vectors to add")
        if not self.index.is_trained:
            raise ValueError(f"{self.spec.kind} index is not trained: build it with VectorIndex.build")
        for start in tqdm(
            range(0, len(rows), _ADD_CHUNK),
            desc=f"{self.spec.kind} index",
            unit="chunk",
            disable=not progress or len(rows) <= _ADD_CHUNK,
        ):
            self.index.add(rows[start : start + _ADD_CHUNK])

    def search(
        self, queries: ArrayLike, k: int, threads: int | None = None, **params: int
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """The ``k`` best rows for each query: (Q, D) float32 -> (scores (Q, k) float32, rows (Q, k) int64).

        Scores are inner products (cosine for unit rows), best first. ``k`` above len(self) is clamped.
        ``threads``: FAISS threads for this call (None: one for fewer than :data:`PARALLEL_MIN_QUERIES`
        queries, else FAISS's default, one per core); ``params``
        override the spec's search parameters for this call (``nprobe`` for ivf, ``ef_search`` for hnsw).
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q = _as_rows(queries, self.dim, "queries")
        k = min(k, len(self))
        if k == 0 or len(q) == 0:
            return np.zeros((len(q), k), np.float32), np.zeros((len(q), k), np.int64)
        search_params = self._search_params(params)
        if len(q) < PARALLEL_MIN_QUERIES and self.spec.kind == "flat":
            return self._search_flat_few(q, k)
        if threads is None and len(q) < PARALLEL_MIN_QUERIES:
            threads = 1
        with _faiss_threads(threads):
            if search_params is None:
                scores, rows = self.index.search(q, k)
            else:
                scores, rows = self.index.search(q, k, params=search_params)
        return scores, rows

    def _search_flat_few(self, q: NDArray[np.float32], k: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """Exact top k of a few queries: one torch matrix product over the stored rows (read in place,
        no copy) and topk. Over 100k x 512 on one thread a query took 31 ms so, 38 ms with numpy and
        68 ms with FAISS's own flat search, even on its BLAS path; torch's thread pool is also the one
        that just encoded the query, so no second OpenMP runtime spin-waits beside it."""
        import torch

        faiss = _faiss()
        stored = faiss.rev_swig_ptr(self.index.get_xb(), len(self) * self.dim).reshape(len(self), self.dim)
        with torch.no_grad():
            top = (torch.from_numpy(q) @ torch.from_numpy(stored).T).topk(k, dim=1)  # (Q, N) -> (Q, k)
        return top.values.numpy(), top.indices.numpy().astype(np.int64)

    def _search_params(self, params: dict[str, int]) -> Any:
        faiss = _faiss()
        allowed = {"ivf": "nprobe", "hnsw": "ef_search"}.get(self.spec.kind)
        unknown = set(params) - {allowed}
        if unknown:
            raise ValueError(f"{self.spec.kind} search takes no parameter {', '.join(sorted(unknown))}")
        if not params:
            return None
        value = params[str(allowed)]
        if self.spec.kind == "ivf":
            return faiss.SearchParametersIVF(nprobe=value)
        return faiss.SearchParametersHNSW(efSearch=value)

    def reconstruct(self, rows: list[int]) -> NDArray[np.float32]:
        """The stored vectors of ``rows`` (R,) -> (R, D) float32 (an IVF index builds its row map once)."""
        if self.spec.kind == "ivf":
            self.index.make_direct_map()  # a no-op once built; row -> (cell, offset)
        return np.stack([self.index.reconstruct(int(i)) for i in rows]) if rows else np.zeros((0, self.dim), np.float32)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to ``path`` (FAISS's own format; write a temporary file and rename it to be atomic)."""
        _faiss().write_index(self.index, str(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str], spec: IndexSpec) -> VectorIndex:
        """Read an index written by :meth:`save` and check it is the ``spec`` it should be.

        Raises ValueError naming ``path`` when FAISS cannot read it or it is another kind of index.
        Only read files whose checksum you verified: FAISS trusts the sizes a file states.
        """
        faiss = _faiss()
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise ValueError(f"{path}: unreadable FAISS index ({str(exc).splitlines()[0]})") from None
        expected = {"flat": faiss.IndexFlatIP, "ivf": faiss.IndexIVFFlat, "hnsw": faiss.IndexHNSWFlat}[spec.kind]
        actual = index  # read_index returns the concrete class (a downcast copy would not own the index)
        if not isinstance(actual, expected) or actual.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"{path}: a {type(actual).__name__}, not the {spec.kind} inner-product index expected")
        p = spec.params
        if spec.kind == "ivf":
            if actual.nlist != p["nlist"]:
                raise ValueError(f"{path}: {actual.nlist} IVF cells, expected {p['nlist']}")
            actual.nprobe = p["nprobe"]
        elif spec.kind == "hnsw":
            actual.hnsw.efSearch = p["ef_search"]
        return cls(actual, spec)
