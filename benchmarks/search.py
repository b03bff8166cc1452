"""Query latency, recall@10, build time and memory of the video index types, beside torch's exact topk.

    python benchmarks/search.py [--n 1000000] [--dim 512] [--clusters 4096] [--queries 200]
                                [--exact-queries 50] [--nprobe 8,16,32] [--ef-search 32,64,128] [--json out.json]

The vectors are clustered as embeddings are, not uniform on the sphere (the worst case for approximate
indexes, and unlike any trained model's embeddings): ``--topics`` (64) random unit directions;
``--clusters`` (4096) cluster centres, each a topic plus noise (cosine ~0.6 to its topic); each vector
a centre plus gaussian noise (cosine ~0.75 to its centre), L2-normalised. Queries are drawn the same way
with more noise (cosine ~0.6 to their centre), like a caption's embedding next to its videos'
(``--point-cosine`` and ``--query-cosine`` set both; lower is harder for the approximate indexes). Rows are
generated block by block into one float32 (N, D) array (N x D x 4 bytes: 2 GB at 1M x 512), which every
method shares without a copy.

Methods, each with the library's defaults (:mod:`mama.inference.vector_index`) unless varied here:

- ``torch topk``: ``(q @ X.T).topk(10)`` over the matrix, what ``mama search`` did before FAISS;
- ``flat``: the library's exact index (FAISS ``IndexFlatIP``; a single query is one torch product over
  its stored rows, which was 2x faster than FAISS's own flat search);
- ``ivf``: ``IndexIVFFlat`` with ~sqrt(N) cells, at each ``--nprobe``;
- ``hnsw``: ``IndexHNSWFlat`` (M=32), at each ``--ef-search``.

Latency is per single query (one query per call, as a user's search is), p50 and p95 over ``--queries``
queries (``--exact-queries`` for the exact methods, which take far longer), measured with one thread and
with the default thread count. Recall@10 is the mean overlap of each method's top 10 with the exact top
10 (from a float64 product). Build time and memory: wall time and the growth of the process's resident
memory while the index is built and held (the shared matrix not counted).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import resource
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from mama.inference.vector_index import VectorIndex, faiss_version, resolve_spec

_GEN_BLOCK = 65_536


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _noisy(rng: np.random.Generator, centres: np.ndarray, cosine: float) -> np.ndarray:
    """Unit vectors at about ``cosine`` to their (unit) ``centres``: centre + gaussian noise of norm tan(angle)."""
    scale = float(np.tan(np.arccos(cosine)) / np.sqrt(centres.shape[1]))
    return _unit(centres + scale * rng.standard_normal(centres.shape, dtype=np.float32))


def make_data(
    n: int,
    dim: int,
    topics: int,
    clusters: int,
    queries: int,
    seed: int,
    point_cosine: float = 0.75,
    query_cosine: float = 0.6,
) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) clustered unit vectors and (queries, dim) queries near the same clusters (float32)."""
    rng = np.random.default_rng(seed)
    topic = _unit(rng.standard_normal((topics, dim), dtype=np.float32))
    centres = _noisy(rng, topic[rng.integers(0, topics, clusters)], 0.6)
    data = np.empty((n, dim), np.float32)
    for start in tqdm(range(0, n, _GEN_BLOCK), desc="vectors", unit="block", leave=False):
        stop = min(n, start + _GEN_BLOCK)
        data[start:stop] = _noisy(rng, centres[rng.integers(0, clusters, stop - start)], point_cosine)
    return data, _noisy(rng, centres[rng.integers(0, clusters, queries)], query_cosine)


def exact_top10(data: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """(Q, 10) exact top-10 rows from float64 products, block by block."""
    best_s = np.full((len(queries), 10), -np.inf)
    best_i = np.zeros((len(queries), 10), np.int64)
    q64 = queries.astype(np.float64)
    for start in range(0, len(data), _GEN_BLOCK):
        s = q64 @ data[start : start + _GEN_BLOCK].astype(np.float64).T
        s_all = np.concatenate([best_s, s], axis=1)
        i_all = np.concatenate([best_i, np.arange(start, start + s.shape[1])[None].repeat(len(q64), 0)], axis=1)
        top = np.argsort(-s_all, axis=1, kind="stable")[:, :10]
        best_s, best_i = np.take_along_axis(s_all, top, 1), np.take_along_axis(i_all, top, 1)
    return best_i


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / 10 for f, t in zip(found, truth, strict=True)]))


def time_queries(search: object, queries: np.ndarray) -> tuple[list[float], np.ndarray]:
    """Per-query seconds over single-query calls ``search(q (1, D)) -> rows (1, 10)``, and the rows."""
    call = search  # typed loosely: a closure over one method
    assert callable(call)
    call(queries[:1])  # warm-up: first-call allocations and thread start-up are not a query's cost
    times, rows = [], []
    for i in range(len(queries)):
        start = time.perf_counter()
        found = call(queries[i : i + 1])
        times.append(time.perf_counter() - start)
        rows.append(found[0])
    return times, np.stack(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors in the index")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--topics", type=int, default=64)
    parser.add_argument("--clusters", type=int, default=4096)
    parser.add_argument("--point-cosine", type=float, default=0.75, help="a vector's cosine to its cluster centre")
    parser.add_argument("--query-cosine", type=float, default=0.6, help="a query's cosine to its cluster centre")
    parser.add_argument("--queries", type=int, default=200, help="single queries timed per approximate method")
    parser.add_argument("--exact-queries", type=int, default=50, help="single queries timed for torch and flat")
    parser.add_argument("--nprobe", default="4,8,16")
    parser.add_argument("--ef-search", default="32,64,128")
    parser.add_argument("--skip", default="", help="comma-separated methods to leave out (torch,flat,ivf,hnsw)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    import faiss

    default_threads = faiss.omp_get_max_threads()
    skip = set(filter(None, args.skip.split(",")))
    print(
        f"{args.n:,} x {args.dim} clustered vectors ({args.clusters} clusters in {args.topics} topics), "
        f"faiss {faiss_version()}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, default threads {default_threads}, load average {os.getloadavg()[0]:.1f}"
    )
    start = time.perf_counter()
    data, queries = make_data(
        args.n, args.dim, args.topics, args.clusters, args.queries, args.seed, args.point_cosine, args.query_cosine
    )
    truth = exact_top10(data, queries)
    print(f"data and exact top-10 in {time.perf_counter() - start:.0f} s")
    n_exact = min(args.exact_queries, args.queries)
    results = []

    def measure(name: str, build_s: float, mem_mb: float, search: object, exact: bool) -> None:
        q = queries[:n_exact] if exact else queries
        row = {"method": name, "build_s": round(build_s, 2), "memory_mb": round(mem_mb)}
        for threads in (1, default_threads):
            torch.set_num_threads(threads)
            faiss.omp_set_num_threads(threads)
            times, found = time_queries(functools.partial(search, threads=threads), q)
            ms = 1e3 * np.asarray(times)
            row[f"p50_ms_{threads}t"] = round(float(np.percentile(ms, 50)), 3)
            row[f"p95_ms_{threads}t"] = round(float(np.percentile(ms, 95)), 3)
            row["recall@10"] = round(recall(found, truth[: len(q)]), 4)
        faiss.omp_set_num_threads(default_threads)
        torch.set_num_threads(default_threads)
        results.append(row)
        print(json.dumps(row), flush=True)

    if "torch" not in skip:
        matrix = torch.from_numpy(data)  # shares the array

        def torch_topk(q: np.ndarray, threads: int) -> np.ndarray:  # threads: set by measure()
            return (torch.from_numpy(q) @ matrix.T).topk(10, dim=1).indices.numpy()

        measure("torch topk", 0.0, 0.0, torch_topk, exact=True)
    configs: list[tuple[str, str, dict[str, int]]] = []
    if "flat" not in skip:
        configs.append(("flat", "flat", {}))
    if "ivf" not in skip:
        configs.append(("ivf", "ivf", {}))
    if "hnsw" not in skip:
        configs.append(("hnsw", "hnsw", {}))
    for kind, label, params in configs:
        gc.collect()
        before = _rss_mb()
        start = time.perf_counter()
        index = VectorIndex.build(data, kind, progress=True, **params)
        build_s = time.perf_counter() - start
        mem = _rss_mb() - before
        spec = index.spec
        print(f"{label}: built {spec} in {build_s:.1f} s, +{mem:.0f} MB", flush=True)
        if kind == "flat":
            measure("flat", build_s, mem, lambda q, threads, index=index: index.search(q, 10, threads)[1], exact=True)
        elif kind == "ivf":
            for nprobe in map(int, args.nprobe.split(",")):
                measure(
                    f"ivf nlist={spec.params['nlist']} nprobe={nprobe}",
                    build_s,
                    mem,
                    lambda q, threads, index=index, nprobe=nprobe: index.search(q, 10, threads, nprobe=nprobe)[1],
                    exact=False,
                )
        else:
            for ef in map(int, args.ef_search.split(",")):
                measure(
                    f"hnsw M={spec.params['m']} efSearch={ef}",
                    build_s,
                    mem,
                    lambda q, threads, index=index, ef=ef: index.search(q, 10, threads, ef_search=ef)[1],
                    exact=False,
                )
        del index
    print(f"\nauto picks {resolve_spec('auto', args.n).kind} at {args.n:,} vectors")
    print(
        f"| method | build s | memory MB | p50 ms 1t | p95 ms 1t | p50 ms {default_threads}t | p95 ms {default_threads}t | recall@10 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['method']} | {r['build_s']} | {r['memory_mb']} | {r['p50_ms_1t']} | {r['p95_ms_1t']} | "
            f"{r[f'p50_ms_{default_threads}t']} | {r[f'p95_ms_{default_threads}t']} | {r['recall@10']} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
