"""Sweep the angular margin mu on SynthVL and report validation retrieval, side by side in one run.

    python benchmarks/margin_sweep.py [--margins 0,0.02,0.05,0.1,0.2] [--meta] [--seed 0] [key=value ...]

Every run shares the data, seed, steps, batch and model; only ``loss.margin`` changes (``--meta`` adds
the meta-learned weighting to every run). Numbers are on the *validation* split so that choosing mu
never looks at the test split. mu = 0 is InfoNCE.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mama.config import load_config
from mama.tasks import train
from mama.tasks.retrieval import load_data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--margins",
        type=lambda t: [float(v) for v in t.split(",")],
        default=[0.0, 0.02, 0.05, 0.1, 0.2],
        help="comma-separated margins in radians",
    )
    parser.add_argument("--meta", action="store_true", help="meta-learned weighting in every run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/margin_sweep")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    base = [
        f"train.seed={args.seed}",
        f"meta.enabled={str(args.meta).lower()}",
        "eval.split=val",
        "train.progress=false",
        "train.overwrite=true",
    ]
    first = load_config(None, base + args.overrides)
    data = load_data(first, progress=False)
    rows = []
    for margin in args.margins:
        out_dir = Path(args.out) / f"margin{margin:g}_seed{args.seed}"
        cfg = load_config(None, base + args.overrides + [f"loss.margin={margin}", f"train.out_dir={out_dir}"])
        result = train(cfg, data=data)
        rows.append((margin, result.metrics, result.step_ms))
        print(f"mu={margin:g} done: val t2v R@1 {result.metrics['t2v_r1']:.1f}", flush=True)

    print(f"\nvalidation split, seed {args.seed}, {first.train.steps} steps, meta={args.meta}")
    print(f"{'mu (rad)':>8} {'t2v R@1':>8} {'R@5':>6} {'v2t R@1':>8} {'head':>6} {'mid':>6} {'tail':>6}  vs mu=0")
    reference = rows[0][1]["t2v_r1"] if rows[0][0] == 0 else None
    for margin, m, _ in rows:
        ratio = f"x{m['t2v_r1'] / reference:.2f}" if reference else ""
        print(
            f"{margin:>8g} {m['t2v_r1']:>8.1f} {m['t2v_r5']:>6.1f} {m['v2t_r1']:>8.1f} "
            f"{m.get('head_t2v_r1', float('nan')):>6.1f} {m.get('mid_t2v_r1', float('nan')):>6.1f} "
            f"{m.get('tail_t2v_r1', float('nan')):>6.1f}  {ratio}"
        )


if __name__ == "__main__":
    main()
