"""Plain vs meta-weighted SynthVL QA under LVLM-like answer noise: paired 95% confidence intervals.

SynthVL QA's wrong training answers are systematic (``mama.data.synthvl_qa.NoiseModel``): fixed
confusions, answers pulled toward the frequent one, and units whose majority training label is wrong.
Both variants train on the same data with the same seeds (``configs/synthvl_qa.yaml``, ``--steps``
steps, one thread per run); the table gives each variant's mean ± std and the paired difference
meta - plain with its 95% t-interval over seeds (:func:`mama.metrics.stats.paired_ci`), overall, per
question type, for rare answers, for the questions whose training answers are systematically wrong
("confusable") and per concept bucket, plus the weighting net's mean weight per kind of noise:

    python benchmarks/qa_noise.py [--seeds 0,1,2,3,4] [--jobs 2] [--steps 500] [--split test]
        [--noise-rate 0.3] [--root data/synthvl] [--out runs/qa_noise] [override ...]

Choose settings with ``--split val`` (and another ``--out``); report ``--split test``. Runs go to
``--out/<variant>_seed<k>`` in subprocesses; a finished run (its metrics.json exists, made with the same
config) is not run again, so an interrupted benchmark continues where it stopped. ``--jobs 2`` trains
two runs at once. The data (SynthVL, its QA files and frame cache) is made once, before the runs.
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

from mama.config import Config, load_config, save_config
from mama.demos.qa import DEFAULT_CONFIG, VARIANTS
from mama.metrics.stats import paired_ci

KEYS = (
    "accuracy",
    "acc_colour",
    "acc_shape",
    "acc_motion",
    "acc_size",
    "acc_background",
    "acc_count",
    "acc_rare_answers",
    "acc_common_answers",
    "acc_confusable",
    "acc_not_confusable",
    "acc_head",
    "acc_mid",
    "acc_tail",
)
WEIGHT_LOG_EVERY = 10  # steps between weights.jsonl records of the meta runs


def run_config(variant: str, seed: int, args: argparse.Namespace, root: str, synthvl: bool) -> Config:
    overrides = [
        f"data.root={root}",
        f"data.synthvl={str(synthvl).lower()}",
        f"qa.synthvl_noise_rate={args.noise_rate}",
        f"train.steps={args.steps}",
        f"train.seed={seed}",
        f"eval.split={args.split}",
        "train.threads=1",
        "train.progress=false",
        f"train.log_weights_every={WEIGHT_LOG_EVERY}",
        f"train.out_dir={Path(args.out) / f'{variant}_seed{seed}'}",
        *VARIANTS[variant],
        *args.overrides,
    ]
    return load_config(DEFAULT_CONFIG, overrides)


def run_one(variant: str, seed: int, args: argparse.Namespace, root: str) -> dict[str, Any]:
    """Train one (variant, seed) in a subprocess, or read its metrics if it already finished."""
    # The subprocess must not regenerate the data the parent made (data.synthvl=false).
    cfg = run_config(variant, seed, args, root, synthvl=False)
    run_dir = Path(cfg.train.out_dir)
    requested = run_dir / "requested.yaml"
    metrics_path = run_dir / "metrics.json"
    run_dir.mkdir(parents=True, exist_ok=True)
    new = run_dir / "requested.yaml.new"
    save_config(cfg, new)
    if metrics_path.exists() and requested.exists():
        if requested.read_text() != new.read_text():
            new.unlink()
            raise SystemExit(f"{run_dir} holds a run with other settings: choose another --out")
        new.unlink()
        return json.loads(metrics_path.read_text())
    new.replace(requested)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    command = [sys.executable, "-m", "mama.cli", "train", "--config", str(requested), "train.overwrite=true"]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} seed {seed} failed:\n{done.stderr[-3000:]}")
    print(f"  {variant} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(metrics_path.read_text())


def weights_by_noise(run_dir: Path, steps: int) -> dict[str, float]:
    """Mean weight per noise kind over the second half of training (1.0 = uniform within a batch)."""
    sums: dict[str, list[float]] = {}
    path = run_dir / "weights.jsonl"
    if not path.exists():
        return {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["step"] <= steps // 2:
            continue
        batch = len(record["weight"])
        for kind, weight in zip(record["noise"], record["weight"], strict=True):
            sums.setdefault(kind, []).append(weight * batch)
    return {kind: statistics.fmean(values) for kind, values in sorted(sums.items())}


def _mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):5.1f} ± {statistics.stdev(values):4.1f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--noise-rate", type=float, default=0.3)
    parser.add_argument("--root", default=None, help="SynthVL folder (default: the recipe's data.root)")
    parser.add_argument("--out", default="runs/qa_noise")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides for every run")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) < 2:
        parser.error("paired intervals need at least 2 seeds")
    root = args.root or load_config(DEFAULT_CONFIG).data.root

    # Generate SynthVL and its QA files and fill the frame cache once, before parallel runs would race.
    from mama.tasks.qa import load_qa_data

    t0 = time.perf_counter()
    load_qa_data(run_config("meta", seeds[0], args, root, synthvl=True), progress=True)
    print(f"data ready in {time.perf_counter() - t0:.0f} s", flush=True)

    jobs = [(variant, seed) for seed in seeds for variant in VARIANTS]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        finished = list(pool.map(lambda job: run_one(job[0], job[1], args, root), jobs))
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for (variant, _), metrics in zip(jobs, finished, strict=True):
        runs[variant].append(metrics)
    weights = [weights_by_noise(Path(args.out) / f"meta_seed{seed}", args.steps) for seed in seeds]

    keys = [k for k in KEYS if all(k in m for rs in runs.values() for m in rs)]
    per_seed = {key: {v: [float(m[key]) for m in rs] for v, rs in runs.items()} for key in keys}
    print(
        f"\nSynthVL QA, {args.split} split, noise rate {args.noise_rate}, {args.steps} steps, seeds {seeds}, "
        f"1 thread per run, {args.jobs} at a time: mean ± std, and meta - plain with its paired 95% CI"
    )
    header = f"{'':<22}{'plain':>14}{'meta':>14}   meta - plain [95% CI]"
    print(header + "\n" + "-" * len(header))
    table: dict[str, dict[str, Any]] = {}
    for key in keys:
        plain, meta = per_seed[key]["plain"], per_seed[key]["meta"]
        ci = paired_ci(meta, plain)
        table[key] = {"plain": plain, "meta": meta, "meta_minus_plain": ci._asdict()}
        flag = " *" if ci.excludes_zero() else ""
        print(f"{key.removeprefix('acc_'):<22}{_mean_std(plain):>14}{_mean_std(meta):>14}   {ci}{flag}")
    print(f"majority answer: {runs['plain'][0]['majority_baseline']:.1f}; * = the interval excludes 0")
    kinds = sorted({k for w in weights for k in w})
    if kinds:
        cells = ", ".join(f"{k} {statistics.fmean(w[k] for w in weights if k in w):.2f}" for k in kinds)
        print(f"meta-weighted runs, mean weight per training-answer kind (2nd half; 1.0 = uniform): {cells}")
    walls = {v: [m["wall_s"] for m in rs] for v, rs in runs.items()}
    print("train s per run (mean): " + ", ".join(f"{v} {statistics.fmean(w):.0f}" for v, w in walls.items()))
    results = {
        "split": args.split, "steps": args.steps, "noise_rate": args.noise_rate, "seeds": seeds, "jobs": args.jobs,
        "overrides": args.overrides, "majority_baseline": runs["plain"][0]["majority_baseline"], "table": table,
        "weights_by_noise": weights, "wall_s": walls,
    }  # fmt: skip
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
