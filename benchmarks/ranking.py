"""Wall time and peak memory of retrieval ranking against the bare similarity matmul, side by side.

N captions x N videos (one caption per video), d-dim random unit vectors in float32, captions noisy
copies of their videos so that recalls are neither 0 nor 100%. Methods:

- ``matmul``: the bare float32 similarity product and nothing else, dense ``(N, N)`` where it fits
  in ``--max-dense-gb``, else the library's tiles written into one reused buffer;
- ``matmul_tiled``: the bare product in the library's tiles (reused buffer), always;
- ``matmul_split``: the same tiles shared out to one Python thread per torch thread, each running
  torch single-threaded: the one pass's own schedule without the counting;
- ``one_pass``: :func:`mama.metrics.retrieval.retrieval_ranks` (one float32 pass, both directions);
- ``two_pass``: the previous chunked path (float64 products, one pass per direction);
- ``dense``: a float64 ``(N, N)`` matrix and two comparisons (skipped above ``--max-dense-gb``).

    python benchmarks/ranking.py [--sizes 10000,100000] [--repeats 3] [--quick] [--chunk-size 1024]
                                 [--max-dense-gb 6] [--slow-max-n 20000] [--dim 512] [--threads 2]

Every measurement runs in a fresh subprocess (``--worker``), so peak memory is that process's
``ru_maxrss``; the inputs are generated block by block (no large temporaries) and the process is
warmed up before the baseline is read, so ``extra = peak - baseline`` is the memory the ranking
itself needed. Methods alternate within each repeat (matmul, one_pass, two_pass, dense, matmul,
...) so that load from other processes hits them alike; the table gives medians over repeats and
each method's time over the fastest bare matmul. ``two_pass`` and ``dense`` are skipped above
``--slow-max-n``. The script checks that all ranking methods give identical ranks and metrics.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from mama.metrics.retrieval import _COLUMN_TILE, _two_pass_ranks, metrics_from_ranks, retrieval_ranks

_GEN_BLOCK = 8192  # rows generated at once, so creating the inputs leaves no large peak behind


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * resource.getpagesize() / 2**20


def make_inputs(num: int, dim: int, caption_noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, d)`` caption and video unit vectors; caption i is a noisy copy of video i."""
    gen = torch.Generator().manual_seed(seed)
    text_emb = torch.empty(num, dim)
    video_emb = torch.empty(num, dim)
    for start in range(0, num, _GEN_BLOCK):
        video = F.normalize(torch.randn(min(_GEN_BLOCK, num - start), dim, generator=gen), dim=1)
        noise = torch.randn(video.shape, generator=gen) * (caption_noise / dim**0.5)
        video_emb[start : start + len(video)] = video
        text_emb[start : start + len(video)] = F.normalize(video + noise, dim=1)
    return text_emb, video_emb


def dense_ranks(text_emb: torch.Tensor, video_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The full ``(N, N)`` matrix, same numerics and pessimistic tie rule as the library (caption i
    belongs to video i, so the own similarities are the diagonal and each count includes the own item)."""
    sim = (text_emb.double() @ video_emb.double().T).float()  # (Q, V)
    own = sim.diagonal().clone()  # (N,)
    t2v = torch.count_nonzero(sim >= own[:, None], dim=1)
    v2t = torch.count_nonzero(sim >= own[None, :], dim=0)
    return t2v, v2t


def bare_matmul(text_emb: torch.Tensor, video_emb: torch.Tensor, dense: bool, chunk_size: int) -> None:
    """Every similarity once in float32, nothing kept: the floor any ranking has to pay."""
    if dense:
        text_emb @ video_emb.T  # (Q, V)
        return
    rows, cols = min(chunk_size, len(text_emb)), min(_COLUMN_TILE, len(video_emb))
    buffer = torch.empty(rows * cols)
    for start in range(0, len(text_emb), rows):
        block = text_emb[start : start + rows]
        for col in range(0, len(video_emb), cols):
            tile = video_emb[col : col + cols]
            torch.matmul(block, tile.T, out=buffer[: len(block) * len(tile)].view(len(block), len(tile)))


def split_matmul(text_emb: torch.Tensor, video_emb: torch.Tensor, chunk_size: int) -> None:
    """The bare product scheduled as the one pass schedules it: tiles shared out to one Python thread
    per torch thread, each running torch single-threaded."""
    threads = torch.get_num_threads()
    starts = iter(range(0, len(text_emb), chunk_size))
    lock = threading.Lock()

    def work() -> None:
        torch.set_num_threads(1)
        try:
            while True:
                with lock:
                    start = next(starts, None)
                if start is None:
                    return
                bare_matmul(text_emb[start : start + chunk_size], video_emb, False, chunk_size)
        finally:
            torch.set_num_threads(threads)

    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(work) for _ in range(threads)]:
            future.result()


METHODS = ("matmul", "matmul_tiled", "matmul_split", "one_pass", "two_pass", "dense")
FLOORS = ("matmul", "matmul_tiled", "matmul_split")
RANKING = ("one_pass", "two_pass", "dense")


def worker(args: argparse.Namespace) -> None:
    """One measurement; prints a JSON line."""
    torch.set_num_threads(args.threads)
    text_emb, video_emb = make_inputs(args.n, args.dim, args.caption_noise, args.seed)
    text_to_video = torch.arange(args.n)
    # Warm up BLAS/thread pools on a tiny problem so their one-off allocations are in the baseline.
    retrieval_ranks(text_emb[:64], video_emb[:64], text_to_video[:64], chunk_size=16)
    _two_pass_ranks(text_emb[:64], video_emb[:64], text_to_video[:64], 16)
    dense_ranks(text_emb[:64], video_emb[:64])
    bare_matmul(text_emb[:64], video_emb[:64], False, 16)
    baseline_max, baseline_now = _max_rss_mb(), _current_rss_mb()

    ranks = None
    start = time.perf_counter()
    if args.worker == "one_pass":
        ranks = retrieval_ranks(text_emb, video_emb, text_to_video, chunk_size=args.chunk_size)
    elif args.worker == "two_pass":
        ranks = _two_pass_ranks(text_emb, video_emb, text_to_video, args.chunk_size)
    elif args.worker == "dense":
        ranks = dense_ranks(text_emb, video_emb)
    elif args.worker == "matmul_split":
        split_matmul(text_emb, video_emb, args.chunk_size)
    else:
        bare_matmul(text_emb, video_emb, args.worker == "matmul" and args.dense_fits, args.chunk_size)
    wall_s = time.perf_counter() - start
    peak = _max_rss_mb()

    result = {"wall_s": wall_s, "baseline_mb": baseline_max, "baseline_now_mb": baseline_now, "peak_mb": peak}
    result["extra_mb"] = peak - baseline_max
    if ranks is not None:
        t2v, v2t = (r.to(torch.int64) for r in ranks)
        result["metrics"] = metrics_from_ranks(t2v, v2t)
        result["ranks_sha"] = hashlib.sha256(t2v.numpy().tobytes() + v2t.numpy().tobytes()).hexdigest()
    print(json.dumps(result))


def measure(method: str, num: int, args: argparse.Namespace, dense_fits: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--n", str(num), "--dim", str(args.dim)]
    cmd += ["--chunk-size", str(args.chunk_size), "--caption-noise", str(args.caption_noise)]
    cmd += ["--seed", str(args.seed), "--threads", str(args.threads)]
    cmd += ["--dense-fits"] if dense_fits else []
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated N")
    parser.add_argument("--quick", action="store_true", help="N = 2000, 5000")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the methods; medians reported")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-dense-gb", type=float, default=6.0)
    parser.add_argument("--slow-max-n", type=int, default=20000, help="largest N for two_pass and dense")
    parser.add_argument("--caption-noise", type=float, default=6.0, help="noise norm relative to the unit video vector")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dense-fits", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return

    sizes = [2000, 5000] if args.quick else [int(s) for s in args.sizes.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    print(
        f"torch {torch.__version__}, {args.threads} threads, d={args.dim}, chunk_size={args.chunk_size},"
        f" column tile={_COLUMN_TILE}, {args.repeats} repeat(s), medians"
    )
    header = (
        f"{'N':>7} {'method':>12} {'wall s':>8} {'x matmul':>9} {'runs':>5} {'peak MB':>8} {'extra MB':>9}  R@1 t2v/v2t"
    )
    print(header)
    print("-" * len(header))
    for num in sizes:
        dense_gb = num * num * 4 * 3 / 1e9  # float64 product + float32 matrix (dense); float32 only for matmul
        runnable = []
        for method in methods:
            if method in ("two_pass", "dense") and num > args.slow_max_n:
                print(f"{num:>7} {method:>12}  skipped: N > --slow-max-n {args.slow_max_n}")
            elif method == "dense" and dense_gb > args.max_dense_gb:
                print(
                    f"{num:>7} {method:>12}  skipped: needs {dense_gb:.1f} GB (> --max-dense-gb {args.max_dense_gb:g})"
                )
            else:
                runnable.append(method)
        matmul_fits = num * num * 4 / 1e9 <= args.max_dense_gb
        runs: dict[str, list[dict]] = {method: [] for method in runnable}
        for _ in range(args.repeats):
            for method in runnable:  # interleaved: every method sees the same background load
                runs[method].append(measure(method, num, args, matmul_fits))

        def median(method: str, key: str, runs: dict[str, list[dict]] = runs) -> float:
            return statistics.median(r[key] for r in runs[method] if "error" not in r)

        ok = {m for m in runnable if runs[m] and all("error" not in r for r in runs[m])}
        floors = [median(m, "wall_s") for m in FLOORS if m in ok]
        floor = min(floors) if floors else float("nan")
        for method in runnable:
            if method not in ok:
                print(f"{num:>7} {method:>12}  failed: {next(r['error'] for r in runs[method] if 'error' in r)}")
                continue
            wall = median(method, "wall_s")
            last = runs[method][-1]
            recall = f"  {last['metrics']['t2v_r1']:.2f}/{last['metrics']['v2t_r1']:.2f}" if "metrics" in last else ""
            label = f"{method}{' (dense)' if method == 'matmul' and matmul_fits else ''}"
            print(
                f"{num:>7} {label:>12} {wall:8.2f} {wall / floor:9.2f} {len(runs[method]):>5}"
                f" {median(method, 'peak_mb'):8.0f} {median(method, 'extra_mb'):9.0f}{recall}"
            )
        per_run = [r for m in RANKING if m in ok for r in runs[m]]
        if per_run:
            same = len({(r["ranks_sha"], json.dumps(r["metrics"], sort_keys=True)) for r in per_run}) == 1
            print(f"{num:>7}  ranks and metrics identical across {sorted(ok & set(RANKING))} x runs: {same}")
        if "one_pass" in ok and floors:
            ratios = [
                o["wall_s"] / min(runs[m][i]["wall_s"] for m in FLOORS if m in ok)
                for i, o in enumerate(runs["one_pass"])
            ]
            print(f"{num:>7}  one_pass / bare matmul per repeat: {' '.join(f'{r:.2f}' for r in ratios)}")


if __name__ == "__main__":
    main()
