"""``mama demo``: InfoNCE vs angular margin vs the small-loss trick vs full MAMA on SynthVL, same seeds,
steps, batch and model, in one of two regimes: ``finetune`` (the default and MAMA's own: every variant
fine-tunes the pretrained model of :mod:`mama.demos.pretrain`) or ``scratch`` (from random weights).

Writes ``results.json``, ``weight_curve.png`` (the learned loss-to-weight map) and ``buckets.png``
(t2v R@1 per concept-frequency bucket) into the output folder and prints a table.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from mama.config import Config, load_config, to_dict
from mama.data.clips import available_cores
from mama.demos.parallel import train_runs
from mama.metrics.stats import paired_ci
from mama.tasks import weight_curve
from mama.tasks.retrieval import load_data
from mama.training.trainer import TrainResult

METRIC_KEYS = [
    "t2v_r1",
    "t2v_r5",
    "t2v_r10",
    "t2v_mdr",
    "t2v_mnr",
    "v2t_r1",
    "v2t_r5",
    "v2t_r10",
    "v2t_mdr",
    "v2t_mnr",
    "head_t2v_r1",
    "mid_t2v_r1",
    "tail_t2v_r1",
    "wall_s",
    "step_ms",
]

VARIANT_NAMES = ("infonce", "margin", "small_loss", "mama")
# Paired comparisons the demo reports (first minus second): the margin alone, the weighting on top of the
# margin, the whole method, and the learned weighting against the small-loss trick it resembles.
COMPARISONS = (("margin", "infonce"), ("mama", "margin"), ("mama", "infonce"), ("mama", "small_loss"))
REGIMES = ("finetune", "scratch")


def variant_overrides(variant: str, margin: float, drop_frac: float = 0.3) -> list[str]:
    """What distinguishes the variants; everything else is shared. ``small_loss`` is the margin loss with
    the small-loss trick (``loss.drop_frac``) in place of the learned weighting."""
    return {
        "infonce": ["loss.margin=0.0", "meta.enabled=false", "loss.drop_frac=0.0"],
        "margin": [f"loss.margin={margin}", "meta.enabled=false", "loss.drop_frac=0.0"],
        "small_loss": [f"loss.margin={margin}", "meta.enabled=false", f"loss.drop_frac={drop_frac}"],
        "mama": [f"loss.margin={margin}", "meta.enabled=true", "loss.drop_frac=0.0", "train.log_weights_every=50"],
    }[variant]


# The fine-tuning regime (MAMA's): every variant starts from the model of mama.demos.pretrain and
# fine-tunes it on the noisy, long-tailed training split. 200 steps keep `make demo` under 5 minutes on 2
# cores; lr 2e-4 beat 1e-4 for InfoNCE on the validation split at 200 steps (24.7 vs 22.2 t2v R@1), as
# did q = 0.3 for the small-loss trick (benchmarks/synthvl_benchmark.py, docs/results.md).
FINETUNE = ["train.steps=200", "optim.lr=2e-4", "meta.lr=1e-3", "train.log_every=25"]
# The quick demo: a smaller SynthVL and a shorter schedule, for smoke tests.
QUICK = ["data.root=data/synthvl_quick", "data.synthvl_scale=0.3", "train.steps=120", "train.log_every=20"]


def regime_overrides(
    regime: str, quick: bool, progress: bool = True, pretrained: Path | None = None, train_pretrained: bool = False
) -> list[str]:
    """The overrides of a regime. ``finetune`` starts from ``pretrained`` (a ``mama export`` folder) or, by
    default, from the model of :func:`mama.demos.pretrain.ensure_pretrained` (the shipped one, or trained
    once and cached). ``train_pretrained``: train that model here even though one ships, and say whether
    it is byte-identical to the shipped one."""
    if regime == "scratch":
        return QUICK if quick else []
    if regime != "finetune":
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    from mama.demos.pretrain import compare_with_shipped, ensure_pretrained, quick_pretraining

    if pretrained is not None:
        return [*FINETUNE, *(QUICK if quick else []), f"model.pretrained={pretrained}"]
    if quick:
        corpus, pre_overrides = quick_pretraining()
        model = ensure_pretrained(Path("data/synthvl_pretrain_quick"), corpus, pre_overrides, progress=progress)
        return [*FINETUNE, *QUICK, f"model.pretrained={model}"]
    model = ensure_pretrained(progress=progress, use_shipped=not train_pretrained)
    same = compare_with_shipped(model) if train_pretrained else None
    if same is not None:
        verdict = "byte-identical to" if all(same.values()) else "different from"
        differing = ", ".join(name for name, ok in same.items() if not ok)
        print(
            f"the pretrained model trained here is {verdict} the shipped one" + (f" ({differing})" if differing else "")
        )
    return [*FINETUNE, f"model.pretrained={model}"]


def variant_config(
    base_path: str | Path | None,
    variant: str,
    seed: int,
    out_dir: Path,
    overrides: list[str],
    regime_extra: list[str],
    margin: float,
    drop_frac: float = 0.3,
) -> Config:
    extra = regime_extra + overrides + variant_overrides(variant, margin, drop_frac)
    extra += [f"train.seed={seed}", f"train.out_dir={out_dir / f'{variant}_seed{seed}'}", "train.overwrite=true"]
    return load_config(base_path, extra)


def paired_gains(per_seed: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """For each of :data:`COMPARISONS`: per-seed differences of t2v R@1 (all, head, mid, tail) and, with
    two seeds or more, their mean with a paired 95% confidence interval."""
    out: dict[str, dict[str, Any]] = {}
    for a, b in COMPARISONS:
        if a not in per_seed or b not in per_seed:
            continue
        entry: dict[str, Any] = {}
        for key in ("t2v_r1", "head_t2v_r1", "mid_t2v_r1", "tail_t2v_r1"):
            xs = [r[key] for r in per_seed[a]]
            ys = [r[key] for r in per_seed[b]]
            diffs = [x - y for x, y in zip(xs, ys, strict=True)]
            item: dict[str, Any] = {"diffs": diffs, "mean": statistics.fmean(diffs)}
            if len(diffs) > 1:
                ci = paired_ci(xs, ys)
                item.update(low=ci.low, high=ci.high)
            entry[key] = item
        out[f"{a} - {b}"] = entry
    return out


def format_gains(gains: dict[str, dict[str, Any]]) -> str:
    """One line per comparison: the mean paired difference (with its 95% CI when there is one)."""

    def cell(item: dict[str, Any]) -> str:
        text = f"{item['mean']:+.1f}"
        return text + (f" [{item['low']:+.1f}, {item['high']:+.1f}]" if "low" in item else "")

    lines = ["paired gains in t2v R@1 points (same seeds; [95% CI] with several seeds): all | head | mid | tail"]
    for name, entry in gains.items():
        parts = [cell(entry[k]) for k in ("t2v_r1", "head_t2v_r1", "mid_t2v_r1", "tail_t2v_r1")]
        lines.append(f"  {name:<20} " + " | ".join(parts))
    return "\n".join(lines)


def _summarise(runs: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in METRIC_KEYS:
        values = [r[key] for r in runs if key in r]
        if values:
            out[key] = statistics.fmean(values)
            if len(values) > 1:
                out[f"{key}_std"] = statistics.stdev(values)
    return out


def _late_mean_weights(history: list[dict[str, Any]]) -> dict[str, float]:
    """Average of the logged per-noise-kind mean weights over the second half of a run."""
    late = [h["weight_by_noise"] for h in history[len(history) // 2 :] if "weight_by_noise" in h]
    kinds = sorted({k for h in late for k in h})
    return {k: statistics.fmean(h[k] for h in late if k in h) for k in kinds}


def format_table(variants: dict[str, dict[str, Any]], chance_r1: float) -> str:
    """Fixed-width table of the demo metrics; with several seeds each cell is ``mean±std``."""
    cols = [
        ("t2v R@1", "t2v_r1"), ("R@5", "t2v_r5"), ("R@10", "t2v_r10"), ("MdR", "t2v_mdr"),
        ("v2t R@1", "v2t_r1"), ("R@5", "v2t_r5"), ("R@10", "v2t_r10"), ("MdR", "v2t_mdr"),
        ("head", "head_t2v_r1"), ("mid", "mid_t2v_r1"), ("tail", "tail_t2v_r1"),
        ("wall s", "wall_s"), ("ms/step", "step_ms"),
    ]  # fmt: skip
    with_std = any(f"{key}_std" in m for m in variants.values() for _, key in cols)
    width = 10 if with_std else 7

    def cell(metrics: dict[str, Any], key: str) -> str:
        value = metrics.get(key, math.nan)
        std = metrics.get(f"{key}_std")
        return (f"{value:.1f}" if std is None else f"{value:.1f}±{std:.1f}").rjust(width)

    lines = ["variant " + " ".join(name.rjust(width) for name, _ in cols)]
    lines += [f"{variant:<8}" + " ".join(cell(m, key) for _, key in cols) for variant, m in variants.items()]
    lines.append(
        f"recalls in %; head/mid/tail = t2v R@1 on test captions of concepts frequent/middle/rare in training; "
        f"chance R@1 = {chance_r1:.2f}%"
    )
    return "\n".join(lines)


def _axes(title: str) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.set_title(title)
    return fig, ax


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_weight_curve(run_dirs: list[Path], path: Path) -> dict[str, Any]:
    """Plot the learned loss -> weight map of each MAMA run, with the mean late-training loss of clean,
    vague and hallucinated captions marked; returns the first run's curve and those means."""
    fig, ax = _axes("Learned loss-to-weight map")
    first: dict[str, Any] = {}
    for run_dir in run_dirs:
        curve = weight_curve(run_dir)
        if curve is None:
            continue
        ax.plot(curve.loss.numpy(), curve.weight.numpy(), label=run_dir.name)
        if not first:
            means = {noise: statistics.fmean(values) for noise, values in curve.late_loss_by_noise.items()}
            # Grey markers with distinct dashes, so they never share a colour with a run's curve.
            for (noise, mean), dash in zip(means.items(), ("--", ":", "-."), strict=False):
                label = "clean" if noise == "none" else noise
                ax.axvline(mean, color="0.4", linestyle=dash, linewidth=1, label=f"mean late loss, {label} captions")
            first = {
                "loss": curve.loss.tolist()[::10],
                "weight": curve.weight.tolist()[::10],
                "mean_loss_by_noise": means,
            }
    ax.set_xlabel("per-sample loss (v2t CE + t2v CE)")
    ax.set_ylabel("weight (before normalisation)")
    ax.legend(fontsize=7)
    _save(fig, path)
    return first


def plot_buckets(variants: dict[str, dict[str, Any]], path: Path) -> None:
    buckets = ["head", "mid", "tail"]
    fig, ax = _axes("Retrieval by training frequency of the concept")
    width = 0.8 / len(variants)
    for i, (variant, metrics) in enumerate(variants.items()):
        values = [metrics.get(f"{b}_t2v_r1", math.nan) for b in buckets]
        errors = [metrics.get(f"{b}_t2v_r1_std", 0.0) for b in buckets]
        ax.bar([j + i * width for j in range(3)], values, width, yerr=errors, label=variant)
    ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(3)], buckets)
    ax.set_ylabel("t2v R@1 (%)")
    ax.legend(fontsize=8)
    _save(fig, path)


def _relative_cost(cfg: Config) -> float:
    """Steps weighted by the meta step's extra cost (about 1.2x a plain step at interval 2)."""
    return cfg.train.steps * (1.25 if cfg.meta.enabled else 1.0)


def _done_line(cfg: Config, result: TrainResult) -> str:
    return (
        f"== {Path(cfg.train.out_dir).name}: t2v R@1 {result.metrics.get('t2v_r1', math.nan):.1f} "
        f"({result.wall_s:.0f} s, {result.step_ms:.0f} ms/step)"
    )


def run_demo(
    out_dir: Path = Path("runs/demo"),
    quick: bool = False,
    margin: float = 0.01,
    seeds: list[int] | None = None,
    config_path: str | Path | None = None,
    overrides: list[str] | None = None,
    progress: bool = True,
    regime: str = "finetune",
    drop_frac: float = 0.3,
    pretrained: Path | None = None,
    jobs: int | None = None,
    train_pretrained: bool = False,
) -> dict[str, Any]:
    """Train every variant per seed in ``regime``, evaluate on the test split, write results and plots.
    ``pretrained``: the model the ``finetune`` regime starts from (default: SynthVL's, shipped or cached).

    Every run trains with one torch thread (``train.threads=1`` unless ``overrides`` say otherwise), in
    ``jobs`` processes at once (default: one per available core, at most one per run): the numbers are
    the same whatever ``jobs`` is and however many cores the machine has."""
    seeds = seeds or [0]
    overrides = ["train.threads=1", *(overrides or [])] + ([] if progress else ["train.progress=false"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    regime_extra = regime_overrides(regime, quick, progress, pretrained, train_pretrained)
    first = variant_config(config_path, "mama", seeds[0], out_dir, overrides, regime_extra, margin, drop_frac)
    data = load_data(first, progress=progress)  # decoded once, shared by every run
    plan = [(seed, variant) for seed in seeds for variant in VARIANT_NAMES]
    jobs = min(len(plan), available_cores()) if jobs is None else max(1, jobs)
    # Runs in their own processes have their progress bars off: one bar counts every run's steps.
    run_extra = overrides + (["train.progress=false"] if jobs > 1 else [])
    cfgs = [
        variant_config(config_path, v, seed, out_dir, run_extra, regime_extra, margin, drop_frac) for seed, v in plan
    ]
    if progress:
        print(
            f"== {regime}: {len(plan)} runs ({', '.join(VARIANT_NAMES)} x seeds {','.join(map(str, seeds))}), "
            f"{jobs} at a time, {cfgs[0].train.threads or 'default'} torch thread(s) each; margin={margin}, "
            f"small-loss drop_frac={drop_frac}",
            flush=True,
        )
    trained = train_runs(cfgs, data, jobs, progress=progress, cost=_relative_cost, on_done=_done_line)
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANT_NAMES}
    mama_dirs: list[Path] = []
    weight_by_noise: list[dict[str, float]] = []
    for (_, variant), result in zip(plan, trained, strict=True):
        runs[variant].append({**result.metrics, "wall_s": result.wall_s, "step_ms": result.step_ms})
        if variant == "mama":
            mama_dirs.append(result.out_dir)
            weight_by_noise.append(_late_mean_weights(result.history))
    variants = {v: _summarise(r) for v, r in runs.items()}
    gains = paired_gains(runs)
    test = data.splits[first.eval.split]
    chance = 100.0 / len(test)
    curve = plot_weight_curve(mama_dirs, out_dir / "weight_curve.png")
    plot_buckets(variants, out_dir / "buckets.png")
    results = {
        "regime": regime,
        "variants": variants,
        "per_seed": runs,
        "paired_gains": gains,
        "seeds": seeds,
        "chance_t2v_r1": chance,
        "weight_curve": curve,
        # Mean MAMA weight per caption noise kind over the second half of training (1.0 = uniform).
        "mama_weight_by_noise": weight_by_noise,
        "config": to_dict(first),
        "jobs": jobs,
        "skipped_videos": data.skipped,
    }
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out_dir / "results.json")
    print(format_table(variants, chance))
    print(format_gains(gains))
    for seed, weights in zip(seeds, weight_by_noise, strict=True):
        print(
            f"MAMA mean weight by caption kind (seed {seed}, 2nd half of training, 1.0 = uniform): "
            + ", ".join(f"{k} {v:.3f}" for k, v in weights.items())
        )
    print(f"results: {out_dir / 'results.json'}; plots: {out_dir / 'weight_curve.png'}, {out_dir / 'buckets.png'}")
    return results
