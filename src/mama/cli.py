"""The ``mama`` command. Each sub-command is a thin wrapper over one library function.

Every library import happens inside the command that needs it: ``mama --help``, ``mama keyframes``
and ``mama search`` up to loading its model never import torch or transformers
(``tests/test_cli_light.py``), since importing torch alone takes longer than finding a 4-s clip's
keyframes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _cmd_synth(args: argparse.Namespace) -> int:
    from mama.data.synthvl import generate, scaled_config

    out = generate(
        Path(args.out), scaled_config(args.seed, args.scale), progress=not args.no_progress, workers=args.workers
    )
    print(f"SynthVL written to {out}")
    return 0


def _cmd_shard(args: argparse.Namespace) -> int:
    from mama.data.shards import shard_dataset

    manifest = shard_dataset(
        args.format, args.source, args.out, videos=args.videos, shard_size_mb=args.shard_size_mb,
        short_side=args.short_side, progress=not args.no_progress,
    )  # fmt: skip
    last = len(manifest["shards"]) - 1
    print(
        f"{manifest['total_samples']} samples in {last + 1} shards ({manifest['total_bytes'] / 2**20:.1f} MiB), "
        f"{len(manifest['skipped'])} skipped: data.urls={Path(args.out) / f'shard-{{000000..{last:06d}}}.tar'}"
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mama.config import load_config
    from mama.tasks import train

    result = train(load_config(args.config, args.overrides), resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns; one prints
        print(json.dumps({"out_dir": str(result.out_dir), **result.metrics}, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from mama.tasks import evaluate_run

    metrics = evaluate_run(Path(args.checkpoint), split=args.split, progress=not args.no_progress)
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from mama.inference.embed import export_pretrained

    out = export_pretrained(Path(args.checkpoint), Path(args.out), overwrite=args.overwrite)
    print(
        f"model written to {out} (load it with mama.inference.embed.Encoder.from_pretrained or `mama embed --model {out}`)"
    )
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from mama.inference.embed import Encoder, build_index, list_inputs

    if args.shards:
        return _embed_shards(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("only --shards splits the work across torchrun ranks; run it as one process")
    videos, texts = list_inputs(
        videos=Path(args.videos) if args.videos else None,
        annotations=Path(args.annotations) if args.annotations else None,
        format=args.format,
        with_texts=args.texts,
    )
    encoder = Encoder.from_pretrained(args.model, device=args.device, num_frames=args.frames)
    info = build_index(
        encoder,
        videos,
        Path(args.out),
        texts,
        args.batch_size,
        args.workers,
        progress=not args.no_progress,
        index_type=args.index_type,
        append=args.append,
    )
    _print_index_summary(args.out, info)
    return 0


def _embed_shards(args: argparse.Namespace) -> int:
    """``mama embed --shards``: one process, or every rank of a torchrun job (each embeds its shards)."""
    from mama.distributed import cleanup, init_distributed
    from mama.inference.embed import Encoder, build_index_from_shards

    if args.videos or args.annotations:
        raise ValueError("give --shards, or --videos/--annotations, not both")
    ctx = init_distributed(args.device)
    failed = True
    try:
        device = str(ctx.device) if ctx.world_size > 1 else args.device
        encoder = Encoder.from_pretrained(args.model, device=device, num_frames=args.frames)
        info = build_index_from_shards(
            encoder,
            args.shards,
            Path(args.out),
            with_texts=args.texts,
            batch_size=args.batch_size,
            workers=args.workers,
            progress=not args.no_progress,
            index_type=args.index_type,
            append=args.append,
        )
        failed = False
    finally:
        cleanup(ctx, failed=failed)
    if ctx.rank == 0:
        _print_index_summary(args.out, info)
    return 0


def _print_index_summary(out: str, info: dict[str, Any]) -> None:
    summary = {key: value for key, value in info.items() if key not in ("files", "model_fingerprint")}
    print(json.dumps({"index": out, **summary, "model_fingerprint": info["model_fingerprint"]["sha256"]}, indent=2))


def _cmd_search(args: argparse.Namespace) -> int:
    from mama.inference.embed import search

    results = search(Path(args.index), args.queries, args.top_k)
    shown = len(results[0]) if results else 0
    if shown < args.top_k:  # to stderr, so that --json output stays one JSON document
        print(
            f"mama search: the index holds {shown} videos, fewer than --top-k {args.top_k}: all are shown",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps([{"query": q, "results": r} for q, r in zip(args.queries, results, strict=True)], indent=2))
        return 0
    for query, hits in zip(args.queries, results, strict=True):
        print(f"query: {query}")
        for hit in hits:
            print(f"  {hit['rank']:>3}  {hit['score']:.4f}  {hit['id']}  {hit['video']}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from mama.serve.app import serve

    serve(
        Path(args.index), args.model, host=args.host, port=args.port, captioners=args.captioner or [],
        runs=Path(args.runs), max_upload_mb=args.max_upload_mb, device=args.device,
    )  # fmt: skip
    return 0


def _cmd_keyframes(args: argparse.Namespace) -> int:
    from mama.augment.keyframes import extract_keyframes, save_image, tile_grid
    from mama.data.video import decode_frames

    result = extract_keyframes(Path(args.video), num=args.num, threshold=args.threshold)
    if args.grid:
        frames = decode_frames(Path(args.video), indices=result.keyframes, short_side=args.tile_size)
        save_image(Path(args.grid), tile_grid(frames, args.rows, args.cols))
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(f"{result.video}: {result.num_frames} frames, fps {result.fps}")
        print(f"peaks ({len(result.peaks)}): {result.peaks}")
        print(f"keyframes ({len(result.keyframes)}): {result.keyframes}")
        if args.grid:
            print(f"grid written to {args.grid}")
    return 0


def _caption_config(args: argparse.Namespace) -> Any:
    from mama.augment.captioner import DEFAULT_MODEL, DEFAULT_PROMPT, CaptionConfig

    return CaptionConfig(
        model=args.model or DEFAULT_MODEL, prompt=args.prompt or DEFAULT_PROMPT, num_captions=args.num_captions, temperature=args.temperature,
        max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
        multi_frame=args.multi_frame, seed=args.seed, min_words=args.min_words, max_words=args.max_words,
        repeat_ngram=args.repeat_ngram,
    )  # fmt: skip


def _keyframe_config(args: argparse.Namespace) -> Any:
    from mama.augment.job import KeyframeConfig

    return KeyframeConfig(
        num=args.num_keyframes, threshold=args.threshold, rows=args.rows, cols=args.cols, tile_short_side=args.tile_size
    )


def _cmd_caption(args: argparse.Namespace) -> int:
    from mama.augment.captioner import LlavaCaptioner
    from mama.augment.job import PrepareCaptionInput

    item = PrepareCaptionInput(_keyframe_config(args), args.multi_frame)(_single_record(Path(args.video)))
    if "error" in item:
        raise ValueError(item["error"])
    captions = LlavaCaptioner(_caption_config(args)).caption([item["image"]])[0]
    if not captions:
        print("(every generation was dropped by the length/repetition filters)", file=sys.stderr)
    for text in captions:
        print(text)
    return 0


def _single_record(video: Path) -> Any:
    from mama.data.records import Caption, VideoRecord

    return VideoRecord(video.stem, video, [Caption("-", "human")])


def _cmd_augment(args: argparse.Namespace) -> int:
    from mama.augment.job import augment, augment_shards, find_shards, merge, parse_shard

    out = Path(args.out)
    if args.merge:
        if args.shards:
            raise ValueError("--merge joins the outputs named by --out: drop --shards")
        shards = [Path(p) for p in args.annotations] if args.annotations else find_shards(out)
        print(json.dumps(merge(shards, out), indent=2))
        return 0
    source: Any  # the shard URLs, or the records of one annotation file
    run: Callable[..., dict[str, Any]]
    if args.shards:
        if args.annotations or args.videos:
            raise ValueError("give either an annotation file (with --videos) or --shards, not both")
        run, source = augment_shards, args.shards
    else:
        if len(args.annotations) != 1:
            raise ValueError("give exactly one annotation file, or --shards (or --merge with the shard files)")
        from mama.data.datasets import read_dataset

        run = augment
        source = read_dataset(args.format, Path(args.annotations[0]), Path(args.videos) if args.videos else None)
    settings = (_caption_config(args), _keyframe_config(args), parse_shard(args.shard), args.workers)
    print(json.dumps(run(source, out, *settings, not args.no_progress), indent=2))
    return 0


def _add_caption_args(p: argparse.ArgumentParser) -> None:
    # Defaults resolved in _caption_config: the captioner module imports torch, the parser must not.
    p.add_argument(
        "--model",
        default=None,
        help="LLaVA hub id or local folder (LLaVA-1.5 / LLaVA-NeXT; default: mama.augment.captioner.DEFAULT_MODEL)",
    )
    p.add_argument("--prompt", default=None, help="default: mama.augment.captioner.DEFAULT_PROMPT")
    p.add_argument("--num-captions", type=int, default=2, help="generations per video")
    p.add_argument("--temperature", type=float, default=0.2, help="0 = greedy")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--min-words", type=int, default=3, help="drop shorter captions (0: keep all)")
    p.add_argument("--max-words", type=int, default=60, help="drop longer captions (0: keep all)")
    p.add_argument(
        "--repeat-ngram", type=int, default=4, help="drop captions repeating an n-gram of this many words (0: off)"
    )
    p.add_argument(
        "--multi-frame", action="store_true", help="one image per keyframe instead of the grid (video-native models)"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:1 ...")
    p.add_argument("--dtype", default="auto", help="auto (bf16/fp16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16")
    p.add_argument("--batch-size", type=int, default=4, help="videos per generate call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-keyframes", type=int, default=12)
    p.add_argument(
        "--threshold", type=float, default=0.1, help="keyframe peak threshold (fraction of the signal range)"
    )
    p.add_argument("--rows", type=int, default=3)
    p.add_argument("--cols", type=int, default=4)
    p.add_argument("--tile-size", type=int, default=224, help="shorter side of each keyframe in the grid")


def _cmd_demo(args: argparse.Namespace) -> int:
    from mama.config import ConfigError
    from mama.demos.retrieval import run_demo

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "mama demo runs in one process; to train the demo's MAMA recipe on several processes use "
            "torchrun ... -m mama.cli train --config configs/synthvl_mama.yaml (see docs/distributed.md)"
        )

    if args.task == "qa":
        from mama.demos.qa import run_qa_demo

        run_qa_demo(
            out_dir=Path(args.out if args.out != "runs/demo" else "runs/demo_qa"), quick=args.quick, seeds=args.seeds,
            config_path=args.config, overrides=args.overrides, progress=not args.no_progress,
        )  # fmt: skip
        return 0
    run_demo(
        out_dir=Path(args.out),
        quick=args.quick,
        margin=args.margin,
        regime=args.regime,
        drop_frac=args.drop_frac,
        seeds=args.seeds,
        config_path=args.config,
        overrides=args.overrides,
        progress=not args.no_progress,
        jobs=args.jobs,
        train_pretrained=args.train_pretrained,
    )
    return 0


def _int_at_least(low: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``, else a clean usage error saying ``what`` was expected."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


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

    p = sub.add_parser(
        "export", help="write a trained model as a self-contained folder (safetensors + config + tokenizer)"
    )
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoints/step_* folder")
    p.add_argument("--out", required=True, help="output folder (refused if it exists and is not empty)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing model folder at --out (atomically: the old one stays until the new one is complete)",
    )
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("embed", help="embed videos (and captions) with a trained model into an index folder")
    p.add_argument("--model", required=True, help="exported model folder, run folder or checkpoint")
    p.add_argument("--out", required=True, help="index folder")
    p.add_argument(
        "--videos",
        default=None,
        help="folder of videos (searched recursively); with --annotations: where its videos are",
    )
    p.add_argument("--annotations", default=None, help="annotation file of a split (any data.format)")
    p.add_argument("--format", default="jsonl", help="annotation layout (see docs/datasets.md)")
    p.add_argument(
        "--shards",
        default=None,
        help="WebDataset shards written by `mama shard` (a brace pattern of paths, http(s):// URLs or pipe: "
        "commands) instead of --videos; under torchrun shard i goes to rank i %% world size",
    )
    p.add_argument(
        "--texts",
        action="store_true",
        help="also embed the human captions (of the annotations or the shards' key.json)",
    )
    p.add_argument("--frames", type=_positive_int, default=None, help="frames per video (default: as trained)")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--workers", type=_non_negative_int, default=0, help="decoding worker processes")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--append",
        action="store_true",
        help="add the videos to the index at --out (built by the same model) without embedding its videos again; "
        "videos whose id it holds are skipped",
    )
    p.add_argument(
        "--index-type",
        choices=("auto", "flat", "ivf", "hnsw"),
        default=None,
        help="FAISS index searched: flat (exact), ivf or hnsw (approximate); auto: flat up to 30,000 videos, "
        "ivf above (default: auto, or the index's own type with --append)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("search", help="find the videos of an index that best match text queries")
    p.add_argument("queries", nargs="+", help="one or more text queries")
    p.add_argument("--index", required=True, help="index folder written by `mama embed`")
    p.add_argument(
        "--top-k", type=_positive_int, default=10, help="results per query (all videos if the index holds fewer)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("serve", help="a local web app: search an index, caption videos, look at training runs")
    p.add_argument("--index", required=True, help="index folder written by `mama embed`")
    p.add_argument("--model", required=True, help="the model that built the index (exported folder, run or checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_positive_int, default=None, help="default: the first free port from 7860")
    p.add_argument(
        "--captioner",
        action="append",
        default=None,
        help="LLaVA model the Caption tab offers (local folder or cached hub id; repeat for several)",
    )
    p.add_argument("--runs", default="runs", help="folder of run folders for the Runs tab")
    p.add_argument("--max-upload-mb", type=float, default=200.0, help="largest video upload accepted, in MiB")
    p.add_argument("--device", default="cpu", help="where the retrieval model runs")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "keyframes", help="find a video's keyframes (MAMA's LVLM front end) and optionally save their grid"
    )
    p.add_argument("video", help="video file or frame folder")
    p.add_argument("--num", type=int, default=12)
    p.add_argument("--threshold", type=float, default=0.1)
    p.add_argument("--grid", default=None, help="write the keyframe grid here (.jpg or .png)")
    p.add_argument("--rows", type=int, default=3)
    p.add_argument("--cols", type=int, default=4)
    p.add_argument("--tile-size", type=int, default=224, help="shorter side of each keyframe in the grid")
    p.add_argument("--json", action="store_true", help='print {"video", "num_frames", "fps", "peaks", "keyframes"}')
    p.set_defaults(func=_cmd_keyframes)

    p = sub.add_parser("caption", help="caption one video with a LLaVA model (keyframe grid + prompt)")
    p.add_argument("video", help="video file or frame folder")
    _add_caption_args(p)
    p.set_defaults(func=_cmd_caption)

    p = sub.add_parser(
        "augment", help="caption every video of an annotation file (or of --shards) into a resumable JSONL"
    )
    p.add_argument(
        "annotations", nargs="*", help="annotation file (with --merge: shard files, default: found next to --out)"
    )
    p.add_argument("--out", required=True, help="output JSONL (appended to; re-runs skip the videos already in it)")
    p.add_argument("--videos", default=None, help="folder the videos are found in, by id (see docs/datasets.md)")
    p.add_argument("--format", default="jsonl", help="annotation layout (data.format)")
    p.add_argument(
        "--shards",
        default=None,
        help="caption WebDataset shards instead of an annotation file: a brace pattern of paths, "
        "http(s):// URLs or pipe: commands (shard-{000000..000011}.tar)",
    )
    p.add_argument(
        "--shard",
        default=None,
        help="I/N: caption every N-th video (with --shards: every N-th shard) from the I-th "
        "(default: torchrun rank/world)",
    )
    p.add_argument("--merge", action="store_true", help="join the shard outputs into --out")
    p.add_argument("--workers", type=int, default=0, help="keyframe extraction processes")
    p.add_argument("--no-progress", action="store_true")
    _add_caption_args(p)
    p.set_defaults(func=_cmd_augment)

    p = sub.add_parser("shard", help="write a dataset into WebDataset tar shards (resumable) for streamed training")
    p.add_argument("source", help="the split's annotation file, or with --format folder a folder of videos")
    p.add_argument("--out", required=True, help="output folder (shard-NNNNNN.tar, manifest.json, index.jsonl)")
    p.add_argument(
        "--format", default="jsonl", help="a data.format reader (jsonl, msrvtt, ...) or 'folder' (videos, no captions)"
    )
    p.add_argument("--videos", default=None, help="folder searched for videos by id (as data.videos)")
    p.add_argument("--shard-size-mb", type=float, default=256.0, help="target shard size in MiB")
    p.add_argument(
        "--short-side", type=int, default=0, help="re-encode videos to this shorter side (0: bytes as they are)"
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_shard)

    p = sub.add_parser("demo", help="InfoNCE vs angular margin vs small-loss vs MAMA on SynthVL")
    p.add_argument(
        "--task",
        choices=("retrieval", "qa"),
        default="retrieval",
        help="retrieval: InfoNCE vs margin vs small-loss vs MAMA; qa: plain vs meta-weighted QA",
    )
    p.add_argument("--quick", action="store_true", help="a smaller, shorter run for smoke tests (< 2 min)")
    p.add_argument("--out", default="runs/demo", help="output folder (results.json, plots, runs)")
    # 0.01 was best of {0, 0.01, 0.02, 0.05} on the SynthVL *validation* split, with and without meta
    # weighting (benchmarks/margin_sweep.py); the authors' QA code used 0.05.
    p.add_argument(
        "--margin", type=float, default=0.01, help="mu (radians) of the margin, small-loss and MAMA variants"
    )
    p.add_argument(
        "--regime",
        choices=("finetune", "scratch"),
        default="finetune",
        help="retrieval: fine-tune a pretrained SynthVL model (MAMA's regime; the shipped one, or --train-pretrained) or train from scratch",
    )
    p.add_argument(
        "--drop-frac",
        type=float,
        default=0.3,  # best of 0.1, 0.2, 0.3 on the validation split (benchmarks/synthvl_benchmark.py)
        help="small-loss variant: fraction of each batch's highest losses dropped",
    )
    p.add_argument(
        "--seeds", type=_int_list, default=[0], help="comma-separated seeds, one run of each variant per seed"
    )
    p.add_argument(
        "--jobs",
        type=_int_at_least(1, "a positive number of runs"),
        default=None,
        help="retrieval: runs trained at once, one torch thread each (default: one per available core); "
        "the numbers do not depend on it",
    )
    p.add_argument(
        "--train-pretrained",
        action="store_true",
        help="retrieval, finetune: pretrain the starting model here instead of using the shipped one, and "
        "say whether it is byte-identical to it",
    )
    p.add_argument("--config", default=None, help="base config (default: the built-in demo config)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every variant")
    p.set_defaults(func=_cmd_demo)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors reported as one line (exit 2): OSError (a missing file or model folder), ValueError
    (ConfigError is one), and CheckpointError when :mod:`mama.checkpoint` was loaded at all (it
    imports torch, so a command that never loaded it cannot have raised it)."""
    errors: list[type[BaseException]] = [OSError, ValueError]
    checkpoint = sys.modules.get("mama.checkpoint")
    if checkpoint is not None:
        errors.append(checkpoint.CheckpointError)
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:
        if not isinstance(exc, _user_errors()):
            raise
        print(f"mama {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
