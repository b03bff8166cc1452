"""Wall time and peak memory of chunked retrieval ranking versus a dense (N, N) similarity matrix.

N captions x N videos (one caption per video), d-dim random unit vectors in float32, captions noisy
copies of their videos so that recalls are neither 0 nor 100%:

    python benchmarks/ranking.py [--sizes 10000,50000,100000] [--quick] [--chunk-size 1024]
                                 [--max-dense-gb 6] [--dim 512]

Every measurement runs in a fresh subprocess (``--worker``), so peak memory is that process's
``ru_maxrss``; the inputs are generated block by block (no large temporaries) and the process is
warmed up before the baseline is read, so ``extra = peak - baseline`` is the memory the ranking
itself needed. Dense is skipped when its ``N·N·4·3`` bytes (float64 product + float32 matrix)
exceed ``--max-dense-gb``. Where both ran, the script checks that their ranks and metrics are
identical. Uses 2 threads; run it alone, a second busy process on 2 cores distorts timings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from mama.metrics.retrieval import _COLUMN_TILE, metrics_from_ranks, retrieval_ranks

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


def worker(args: argparse.Namespace) -> None:
    """One measurement; prints a JSON line."""
    torch.set_num_threads(2)
    text_emb, video_emb = make_inputs(args.n, args.dim, args.caption_noise, args.seed)
    text_to_video = torch.arange(args.n)
    # Warm up BLAS/thread pools on a tiny problem so their one-off allocations are in the baseline.
    retrieval_ranks(text_emb[:64], video_emb[:64], text_to_video[:64], chunk_size=16)
    dense_ranks(text_emb[:64], video_emb[:64])
    baseline_max, baseline_now = _max_rss_mb(), _current_rss_mb()

    start = time.perf_counter()
    if args.worker == "chunked":
        t2v, v2t = retrieval_ranks(text_emb, video_emb, text_to_video, chunk_size=args.chunk_size)
    else:
        t2v, v2t = dense_ranks(text_emb, video_emb)
    wall_s = time.perf_counter() - start
    peak = _max_rss_mb()

    digest = hashlib.sha256(t2v.to(torch.int64).numpy().tobytes() + v2t.to(torch.int64).numpy().tobytes())
    print(
        json.dumps(
            {
                "wall_s": wall_s,
                "baseline_mb": baseline_max,
                "baseline_now_mb": baseline_now,
                "peak_mb": peak,
                "extra_mb": peak - baseline_max,
                "metrics": metrics_from_ranks(t2v, v2t),
                "ranks_sha": digest.hexdigest(),
            }
        )
    )


def measure(method: str, num: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--n",
        str(num),
        "--dim",
        str(args.dim),
        "--chunk-size",
        str(args.chunk_size),
        "--caption-noise",
        str(args.caption_noise),
        "--seed",
        str(args.seed),
    ]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,50000,100000", help="comma-separated N")
    parser.add_argument("--quick", action="store_true", help="N = 2000, 5000")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--max-dense-gb", type=float, default=6.0)
    parser.add_argument("--caption-noise", type=float, default=6.0, help="noise norm relative to the unit video vector")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=["chunked", "dense"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return

    sizes = [2000, 5000] if args.quick else [int(s) for s in args.sizes.split(",")]
    print(
        f"torch {torch.__version__}, 2 threads, d={args.dim}, chunk_size={args.chunk_size}, column tile={_COLUMN_TILE}"
    )
    header = f"{'N':>7} {'method':>8} {'wall s':>8} {'baseline MB':>12} {'peak MB':>9} {'extra MB':>9} {'model MB':>9}  R@1 t2v/v2t"
    print(header)
    print("-" * len(header))
    summary = []
    for num in sizes:
        # The library's peak formula for raw ranking: float32 scores 4·c·N + per-tile temporaries.
        c, w = min(args.chunk_size, num), min(_COLUMN_TILE, num)
        model_mb = (4 * c * num + 12 * c * w + 8 * w * args.dim) / 2**20
        results = {"chunked": measure("chunked", num, args)}
        dense_gb = num * num * 4 * 3 / 1e9
        results["dense"] = measure("dense", num, args) if dense_gb <= args.max_dense_gb else None
        for method, res in results.items():
            if res is None:
                print(
                    f"{num:>7} {method:>8}  skipped: needs {dense_gb:.1f} GB (> --max-dense-gb {args.max_dense_gb:g})"
                )
            elif "error" in res:
                print(f"{num:>7} {method:>8}  failed: {res['error']}")
            else:
                model = f"{model_mb:9.0f}" if method == "chunked" else f"{dense_gb * 1e9 / 2**20:9.0f}"
                m = res["metrics"]
                print(
                    f"{num:>7} {method:>8} {res['wall_s']:8.2f} {res['baseline_mb']:12.0f} {res['peak_mb']:9.0f}"
                    f" {res['extra_mb']:9.0f} {model}  {m['t2v_r1']:.2f}/{m['v2t_r1']:.2f}"
                )
        summary.append((num, results))

    print("\nratios (chunked / dense), where both ran:")
    for num, results in summary:
        chunked, dense = results["chunked"], results["dense"]
        if not dense or "error" in dense or "error" in chunked:
            print(f"{num:>7}  n/a (dense {'skipped' if dense is None else 'failed'})")
            continue
        same = chunked["metrics"] == dense["metrics"] and chunked["ranks_sha"] == dense["ranks_sha"]
        print(
            f"{num:>7}  time {chunked['wall_s'] / dense['wall_s']:.2f}x"
            f"  extra memory {chunked['extra_mb'] / max(dense['extra_mb'], 1e-9):.3f}x"
            f"  ranks and metrics identical: {same}"
        )


if __name__ == "__main__":
    main()
