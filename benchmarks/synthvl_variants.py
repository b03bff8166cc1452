"""Accuracy of the cheaper meta-step variants on SynthVL: test t2v R@1 (all and tail) over seeds.

Every variant is the demo's full-size recipe (``mama demo``: same data, model, steps, batch, margin)
and differs only in how the weighting net is meta-trained; InfoNCE is the baseline the gain is
measured against. For each variant the table gives mean ± std over seeds, its gain over InfoNCE,
and that gain as a share of the full meta step's gain (exact second-order step, every step):

    python benchmarks/synthvl_variants.py [--seeds 0,1,2] [--jobs 2] [--variants "a;b"] [--out runs/variants]

Runs go to ``--out/<variant>_seed<k>``; a finished run (its metrics.json exists) is not run again,
so an interrupted benchmark continues where it stopped. ``--jobs 2`` trains two runs at once with
one thread each (throughput on 2 cores); their ms/step are then not comparable to a lone run: take
step-time ratios from benchmarks/meta_overhead.py.
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

from mama.config import save_config
from mama.demos.retrieval import variant_config
from mama.tasks.retrieval import load_data

# name -> (demo variant, extra overrides). meta.lr is per training step (an update every k steps
# uses k * meta.lr); the "update lr 1e-4" variants undo that scaling to keep each update at 1e-4.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "infonce": ("infonce", []),
    "exact every step (full)": ("mama", ["meta.interval=1"]),
    "exact every 2 (default)": ("mama", ["meta.interval=2"]),
    "exact every 2, update lr 1e-4": ("mama", ["meta.interval=2", "meta.lr=5e-5"]),
    "exact every 4, update lr 1e-4": ("mama", ["meta.interval=4", "meta.lr=2.5e-5"]),
    "first-order every step": ("mama", ["meta.interval=1", "meta.method=first_order"]),
    "first-order every 2, update lr 1e-4": ("mama", ["meta.method=first_order", "meta.interval=2", "meta.lr=5e-5"]),
}
FULL = "exact every step (full)"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def run_one(name: str, seed: int, out: Path, margin: float, threads: int) -> dict[str, float]:
    """Train one (variant, seed) in a subprocess, or read its metrics if it already finished."""
    variant, extra = VARIANTS[name]
    run_dir = out / f"{_slug(name)}_seed{seed}"
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists():
        return json.loads(metrics_path.read_text())
    cfg = variant_config(
        None, variant, seed, out, [*extra, f"train.threads={threads}", "train.progress=false"], [], margin
    )
    cfg.train.out_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "requested.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mama.cli", "train", "--config", str(run_dir / "requested.yaml")],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed:\n{done.stderr[-3000:]}")
    print(f"  {name} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(metrics_path.read_text())


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f}±{statistics.stdev(values):.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--variants", default=";".join(VARIANTS), help="semicolon-separated names from VARIANTS")
    parser.add_argument("--margin", type=float, default=0.01, help="the demo's margin")
    parser.add_argument("--out", default="runs/variants")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [n.strip() for n in args.variants.split(";") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    out = Path(args.out)
    # Generate the data and fill the frame cache once, before parallel runs would race to do it.
    load_data(variant_config(None, "mama", seeds[0], out, [], [], args.margin), progress=True)

    threads = 1 if args.jobs > 1 else 0
    jobs = [(name, seed) for seed in seeds for name in names]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda job: run_one(job[0], job[1], out, args.margin, threads), jobs))
    by_variant: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for (name, _), metrics in zip(jobs, results, strict=True):
        by_variant[name].append(metrics)

    def mean(name: str, key: str) -> float:
        return statistics.fmean(m[key] for m in by_variant[name])

    print(f"\nSynthVL test, {len(seeds)} seeds ({args.seeds}), margin {args.margin}: mean±std")
    header = (
        f"{'variant':<26} {'t2v R@1':>10} {'tail R@1':>10} {'gain':>6} {'of full':>8} {'tail gain':>10} {'of full':>8}"
    )
    print(header)
    print("-" * len(header))
    base = "infonce" if "infonce" in by_variant else None
    for name in names:
        r1 = [m["t2v_r1"] for m in by_variant[name]]
        tail = [m["tail_t2v_r1"] for m in by_variant[name]]
        row = f"{name:<26} {_mean_std(r1):>10} {_mean_std(tail):>10}"
        if base and name != base:
            gain, tail_gain = (
                mean(name, "t2v_r1") - mean(base, "t2v_r1"),
                mean(name, "tail_t2v_r1") - mean(base, "tail_t2v_r1"),
            )
            row += f" {gain:>+6.1f}"
            if FULL in by_variant:
                full_gain = mean(FULL, "t2v_r1") - mean(base, "t2v_r1")
                row += f" {100 * gain / full_gain:>7.0f}%" if full_gain else f" {'n/a':>8}"
            row += f" {tail_gain:>+10.1f}"
            if FULL in by_variant:
                full_tail = mean(FULL, "tail_t2v_r1") - mean(base, "tail_t2v_r1")
                row += f" {100 * tail_gain / full_tail:>7.0f}%" if full_tail else f" {'n/a':>8}"
        print(row)
    summary = {name: by_variant[name] for name in names}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nper-run metrics: {out / 'summary.json'}")


if __name__ == "__main__":
    main()
