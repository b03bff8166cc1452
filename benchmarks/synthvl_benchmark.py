"""The SynthVL benchmark behind the demo: every variant over several seeds in both regimes, its spread, its
sensitivity to the thread count, and paired confidence intervals for the paper's claims.

    python benchmarks/synthvl_benchmark.py [--regimes finetune,scratch] [--seeds 0,1,2,3,4]
        [--split test] [--threads 2] [--thread-check] [--select-drop 0.1,0.2,0.3] [--out runs/benchmark]

For each regime (``mama.demos.retrieval.REGIMES``) and seed it trains InfoNCE, the angular margin, the
small-loss trick and MAMA with the demo's settings, each in its own process with ``--threads`` torch
threads, and prints:

- per variant: mean ± std over seeds of t2v R@1 (all / head / mid / tail concepts);
- ``--thread-check``: seed 0 of every variant again with the other thread count (1 <-> 2: another
  summation order, as on another machine) and its difference from the ``--threads`` run;
- paired differences with 95% confidence intervals (``mama.metrics.stats.paired_ci``): margin vs
  InfoNCE, MAMA vs margin, MAMA vs InfoNCE and MAMA vs the small-loss trick.

``--select-drop``: first choose the small-loss trick's dropped fraction q on the validation split
(seed 0, highest t2v R@1), then use it for the runs on ``--split``. Runs go to
``--out/<regime>/<split>/<variant>_seed<k>_t<threads>``; a finished run (metrics.json, made with the same
settings) is read, not rerun, so an interrupted benchmark continues where it stopped. Trailing dotted
overrides (``train.steps=200``) apply to every run. Run it alone: it measures nothing about
speed, but a second busy process only slows it down.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mama.config import load_config, save_config
from mama.demos.retrieval import (
    REGIMES,
    VARIANT_NAMES,
    format_gains,
    paired_gains,
    regime_overrides,
    variant_config,
)

KEYS = ("t2v_r1", "head_t2v_r1", "mid_t2v_r1", "tail_t2v_r1")
EXTRA: list[str] = []  # the command line's dotted overrides, applied to every run


def run_one(
    regime_extra: list[str], variant: str, seed: int, threads: int, split: str, out: Path, margin: float, drop: float
) -> dict[str, float]:
    """Train one run in a subprocess, or read its metrics if it already finished."""
    tag = f"_q{drop}" if variant == "small_loss" else ""
    run_dir = out / split / f"{variant}{tag}_seed{seed}_t{threads}"
    metrics_path = run_dir / "metrics.json"
    extra = [*EXTRA, f"train.threads={threads}", "train.progress=false", f"eval.split={split}"]
    cfg = variant_config(None, variant, seed, out, extra, regime_extra, margin, drop)
    cfg.train.out_dir = str(run_dir)
    requested = run_dir / "requested.yaml"
    if metrics_path.exists() and requested.exists():
        # Finished with the same settings: read it. Other settings: train it again.
        if load_config(requested) == cfg:
            return json.loads(metrics_path.read_text())
        print(f"  {run_dir.name}: settings changed since it ran; training it again", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, requested)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mama.cli", "train", "--config", str(run_dir / "requested.yaml")],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{run_dir} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads(metrics_path.read_text())
    print(f"  {run_dir.name}: t2v R@1 {metrics['t2v_r1']:.1f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return metrics


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def select_drop(regime_extra: list[str], candidates: list[float], out: Path, args: argparse.Namespace) -> float:
    """The small-loss trick's q with the best validation t2v R@1 (seed 0)."""
    with ThreadPoolExecutor(args.jobs) as pool:
        found = pool.map(
            lambda q: run_one(regime_extra, "small_loss", 0, args.threads, "val", out, args.margin, q), candidates
        )
        scores = {q: m["t2v_r1"] for q, m in zip(candidates, found, strict=True)}
    best = max(scores, key=lambda q: (scores[q], -q))
    print("  small-loss q on val: " + ", ".join(f"{q}: {r:.1f}" for q, r in scores.items()) + f" -> {best}")
    return best


def bench_regime(regime: str, args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out) / regime
    regime_extra = regime_overrides(regime, quick=False, progress=False)
    drop = select_drop(regime_extra, args.select_drop, out, args) if args.select_drop else 0.3
    other = 2 if args.threads == 1 else 1
    jobs = [(v, s, args.threads) for s in args.seeds for v in VARIANT_NAMES]
    jobs += [(v, args.seeds[0], other) for v in VARIANT_NAMES] if args.thread_check else []
    with ThreadPoolExecutor(args.jobs) as pool:
        done = dict(
            zip(
                jobs,
                pool.map(lambda j: run_one(regime_extra, j[0], j[1], j[2], args.split, out, args.margin, drop), jobs),
                strict=True,
            )
        )
    per_seed = {v: [done[(v, s, args.threads)] for s in args.seeds] for v in VARIANT_NAMES}
    thread_diff: dict[str, float] = {}  # other thread count minus --threads, seed 0
    if args.thread_check:
        for variant in VARIANT_NAMES:
            thread_diff[variant] = done[(variant, args.seeds[0], other)]["t2v_r1"] - per_seed[variant][0]["t2v_r1"]
    summary = {
        "regime": regime,
        "split": args.split,
        "seeds": args.seeds,
        "threads": args.threads,
        "small_loss_drop_frac": drop,
        "per_seed": {v: [{k: m[k] for k in KEYS} for m in ms] for v, ms in per_seed.items()},
        "std_t2v_r1": {
            v: statistics.stdev([m["t2v_r1"] for m in ms]) if len(ms) > 1 else 0.0 for v, ms in per_seed.items()
        },
        "other_threads_minus_main_seed0": thread_diff,
        "paired_gains": paired_gains(per_seed),
    }
    print(f"\n### {regime} ({args.split} split, seeds {','.join(map(str, args.seeds))}, {args.threads} threads)\n")
    print(f"| variant | t2v R@1 | head | mid | tail | {other} threads - {args.threads} (seed 0) |")
    print("|---|---|---|---|---|---|")
    for variant, ms in per_seed.items():
        cells = [_mean_std([m[k] for m in ms]) for k in KEYS]
        diff = f"{thread_diff[variant]:+.1f}" if variant in thread_diff else ""
        print(f"| {variant} | " + " | ".join(cells) + f" | {diff} |")
    print()
    print(format_gains(summary["paired_gains"]))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--thread-check", action="store_true", help="seed 0 again with the other thread count (1 <-> 2)"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at once; more than one only with --threads 1 (2 cores)"
    )
    parser.add_argument("--select-drop", default="", help="q candidates for the small-loss trick, chosen on val")
    parser.add_argument("--margin", type=float, default=0.01)
    parser.add_argument("--out", default="runs/benchmark")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run (use another --out)")
    args = parser.parse_args()
    EXTRA[:] = args.overrides
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.select_drop = [float(q) for q in args.select_drop.split(",") if q]
    summaries = [bench_regime(regime, args) for regime in args.regimes.split(",")]
    path = Path(args.out) / f"summary_{args.regimes.replace(',', '_')}_{args.split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summaries, indent=2))
    print(f"\nsummary: {path}")


if __name__ == "__main__":
    main()
