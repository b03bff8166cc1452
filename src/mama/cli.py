"""The ``mama`` command. Each sub-command is a thin wrapper over one library function."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mama.checkpoint import CheckpointError
from mama.config import ConfigError


def _cmd_synth(args: argparse.Namespace) -> int:
    from mama.data.synthvl import generate
    from mama.engine import synthvl_config

    out = generate(Path(args.out), synthvl_config(args.seed, args.scale), progress=not args.no_progress, workers=args.workers)
    print(f"SynthVL written to {out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mama.config import load_config
    from mama.engine import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns; one prints
        print(json.dumps({"out_dir": str(result.out_dir), **result.metrics}, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from mama.engine import evaluate_checkpoint

    metrics = evaluate_checkpoint(Path(args.checkpoint), split=args.split, progress=not args.no_progress)
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from mama.embed import export_pretrained

    out = export_pretrained(Path(args.checkpoint), Path(args.out))
    print(f"model written to {out} (load it with mama.embed.Encoder.from_pretrained or `mama embed --model {out}`)")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from mama.embed import Encoder, build_index, list_inputs

    videos, texts = list_inputs(
        videos=Path(args.videos) if args.videos else None,
        annotations=Path(args.annotations) if args.annotations else None,
        format=args.format,
        with_texts=args.texts,
    )
    encoder = Encoder.from_pretrained(args.model, device=args.device, num_frames=args.frames)
    info = build_index(encoder, videos, Path(args.out), texts, args.batch_size, args.workers, progress=not args.no_progress)
    print(json.dumps({"index": args.out, **info}, indent=2))
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from mama.embed import search

    results = search(Path(args.index), args.queries, args.top_k)
    if args.json:
        print(json.dumps([{"query": q, "results": r} for q, r in zip(args.queries, results, strict=True)], indent=2))
        return 0
    for query, hits in zip(args.queries, results, strict=True):
        print(f"query: {query}")
        for hit in hits:
            print(f"  {hit['rank']:>3}  {hit['score']:.4f}  {hit['id']}  {hit['video']}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mama.demo import run_demo

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "mama demo runs in one process; to train the demo's MAMA recipe on several processes use "
            "torchrun ... -m mama.cli train --config configs/synthvl_mama.yaml (see docs/distributed.md)"
        )

    run_demo(
        out_dir=Path(args.out),
        quick=args.quick,
        margin=args.margin,
        seeds=args.seeds,
        config_path=args.config,
        overrides=args.overrides,
        progress=not args.no_progress,
    )
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mama", description="MAMA video-language representation learning")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="generate the SynthVL benchmark (MP4 videos + JSONL annotations)")
    p.add_argument("--out", default="data/synthvl", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every split size")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in train.out_dir")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.margin=0.05 train.steps=200")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained run or checkpoint")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoints/step_* folder")
    p.add_argument("--split", default=None, help="train | meta | val | test (default: the config's)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("export", help="write a trained model as a self-contained folder (safetensors + config + tokenizer)")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoints/step_* folder")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("embed", help="embed videos (and captions) with a trained model into an index folder")
    p.add_argument("--model", required=True, help="exported model folder, run folder or checkpoint")
    p.add_argument("--out", required=True, help="index folder")
    p.add_argument("--videos", default=None, help="folder of videos (searched recursively); with --annotations: where its videos are")
    p.add_argument("--annotations", default=None, help="annotation file of a split (any data.format)")
    p.add_argument("--format", default="jsonl", help="annotation layout (see docs/datasets.md)")
    p.add_argument("--texts", action="store_true", help="also embed the annotations' human captions")
    p.add_argument("--frames", type=int, default=None, help="frames per video (default: as trained)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0, help="decoding worker processes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("search", help="find the videos of an index that best match text queries")
    p.add_argument("queries", nargs="+", help="one or more text queries")
    p.add_argument("--index", required=True, help="index folder written by `mama embed`")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("demo", help="InfoNCE vs angular margin vs MAMA on SynthVL")
    p.add_argument("--quick", action="store_true", help="a smaller, shorter run for smoke tests (< 2 min)")
    p.add_argument("--out", default="runs/demo", help="output folder (results.json, plots, runs)")
    # 0.01 was best of {0, 0.01, 0.02, 0.05} on the SynthVL *validation* split, with and without meta
    # weighting (benchmarks/margin_sweep.py); the authors' QA code used 0.05.
    p.add_argument("--margin", type=float, default=0.01, help="mu (radians) of the margin and MAMA variants")
    p.add_argument("--seeds", type=_int_list, default=[0], help="comma-separated seeds, one run of each variant per seed")
    p.add_argument("--config", default=None, help="base config (default: the built-in demo config)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every variant")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, CheckpointError, ValueError) as exc:
        print(f"mama {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
