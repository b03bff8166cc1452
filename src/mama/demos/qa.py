"""``mama demo --task qa``: plain vs meta-weighted open-ended QA on SynthVL, same seed, steps and model.

Writes ``results.json`` into the output folder and prints accuracy overall, per question type, and per
answer-frequency bucket (tail answers), next to the majority-answer baseline.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from mama.config import load_config
from mama.metrics.stats import PairedCI, paired_ci

VARIANTS = {"plain": ["meta.enabled=false"], "meta": ["meta.enabled=true"]}
DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "synthvl_qa.yaml"
# The quick demo: a smaller SynthVL and a shorter schedule, for smoke tests.
QUICK = ["data.root=data/synthvl_quick", "data.synthvl_scale=0.3", "train.steps=150", "train.log_every=50"]
KEYS = (
    "accuracy",
    "acc_colour",
    "acc_shape",
    "acc_motion",
    "acc_size",
    "acc_background",
    "acc_count",
    "acc_rare_answers",
    "acc_confusable",
    "acc_head",
    "acc_mid",
    "acc_tail",
)


def run_qa_demo(
    out_dir: Path = Path("runs/demo_qa"),
    quick: bool = False,
    seeds: list[int] | None = None,
    config_path: str | Path | None = None,
    overrides: list[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train both variants per seed, evaluate on the test split, write and print the comparison."""
    from mama.tasks import train
    from mama.tasks.qa import load_qa_data

    seeds = seeds or [0]
    base = config_path or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    if base is None:
        raise FileNotFoundError("configs/synthvl_qa.yaml not found: pass --config")
    extra = (QUICK if quick else []) + list(overrides or []) + ([] if progress else ["train.progress=false"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def config(variant: str, seed: int) -> Any:
        return load_config(
            base,
            [
                *extra,
                *VARIANTS[variant],
                f"train.seed={seed}",
                f"train.out_dir={out_dir / f'{variant}_seed{seed}'}",
                "train.overwrite=true",
            ],
        )

    data = load_qa_data(config("meta", seeds[0]), progress=progress)  # decoded once, shared by every run
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    baseline = None
    for seed in seeds:
        for variant in VARIANTS:
            if progress:
                print(f"== {variant} QA (seed {seed})", flush=True)
            result = train(config(variant, seed), data=data)
            runs[variant].append({**result.metrics, "wall_s": result.wall_s})
            baseline = result.metrics["majority_baseline"]
    summary = {
        variant: {
            key: statistics.fmean(r[key] for r in rs if key in r)
            for key in (*KEYS, "wall_s")
            if any(key in r for r in rs)
        }
        for variant, rs in runs.items()
    }
    results = {"seeds": seeds, "majority_baseline": baseline, "variants": summary, "runs": runs}
    if len(seeds) >= 2:  # meta - plain per seed: a paired 95% t-interval
        keys = [k for k in KEYS if all(k in r for rs in runs.values() for r in rs)]
        results["meta_minus_plain"] = {
            k: paired_ci([r[k] for r in runs["meta"]], [r[k] for r in runs["plain"]])._asdict() for k in keys
        }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    _print_table(results)
    return results


def _print_table(results: dict[str, Any]) -> None:
    columns = [k for k in KEYS if all(k in v for v in results["variants"].values())]
    names = [c.removeprefix("acc_") for c in columns]
    widths = [max(11, len(n) + 2) for n in names]
    print(f"{'variant':8}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths, strict=True)) + f"{'wall s':>9}")
    for variant, values in results["variants"].items():
        cells = "".join(f"{values[c]:>{w}.1f}" for c, w in zip(columns, widths, strict=True))
        print(f"{variant:8}" + cells + f"{values.get('wall_s', float('nan')):>9.0f}")
    print(
        f"top-1 accuracy in % on the balanced test split (every question counts; out-of-vocabulary answers are wrong); "
        f"majority-answer baseline {results['majority_baseline']:.1f}%; rare_answers = questions whose answer is in "
        f"the least frequent third of its type's training answers; confusable = questions of the kinds whose training "
        f"answers are mostly wrong (systematic noise); head/mid/tail = questions about videos of "
        f"frequent/middle/rare concepts; mean over seeds {results['seeds']}"
    )
    if "meta_minus_plain" in results:
        gains = [f"{k.removeprefix('acc_')} {PairedCI(**ci)}" for k, ci in results["meta_minus_plain"].items()]
        print("meta - plain, mean and paired 95% CI over seeds: " + "; ".join(gains))
