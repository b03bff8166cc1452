"""Step-time cost of the meta-weighted (MAMA) step relative to a plain contrastive step.

Same model, same batch, same process; the variants' steps are timed in interleaved rounds of 4 steps
(``--repeats`` steps per variant in all, after ``--warmup`` steps), and the mean step time over whole
meta periods is reported together with its ratio to the plain step:

    python benchmarks/meta_overhead.py [--batch-size 64] [--repeats 32] [--device cpu|cuda]
                                       [--precision fp32|bf16] [key=value model overrides]

Variants cross the three ways to make the meta step cheaper: the virtual
step over all parameters or only the projection heads + logit scale (``meta.virtual_params``), a meta
update every k steps (``meta.interval``), and the exact second-order meta-gradient or its first-order
linearisation (``meta.method``). Run it alone: a second busy process on 2 cores distorts timings.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

from mama.config import load_config
from mama.models import create_model
from mama.precision import grad_scaler
from mama.tasks.retrieval import RetrievalModule
from mama.tokenizer import WordTokenizer
from mama.training.state import TrainState
from mama.training.step import StepSettings, meta_weighted_step
from mama.weighting import MetaWeighting

WORDS = [
    "a",
    "the",
    "small",
    "large",
    "red",
    "green",
    "blue",
    "yellow",
    "circle",
    "square",
    "triangle",
    "moves",
    "left",
    "right",
    "up",
    "down",
    "on",
    "background",
]


def make_batch(cfg, tokenizer: WordTokenizer, batch_size: int, generator: torch.Generator) -> dict:
    video = torch.randn(
        batch_size, cfg.data.num_frames, 3, cfg.data.frame_size, cfg.data.frame_size, generator=generator
    )
    picks = torch.randint(len(WORDS), (batch_size, 10), generator=generator)
    ids, mask = tokenizer([" ".join(WORDS[i] for i in row) for row in picks.tolist()])
    return {"video": video, "input_ids": ids, "attention_mask": mask}


def time_interleaved(
    steps: dict[str, Callable[[int], None]], warmup: int, rounds: int, period: int = 4
) -> dict[str, float]:
    """Mean step time (ms) per variant, measured in interleaved rounds so that drift of a shared,
    noisy machine hits every variant alike: each round times ``period`` consecutive steps (a whole
    meta period for intervals 1, 2 and 4) of every variant in turn. Returns the median over rounds
    of each variant's per-round mean."""
    for step in steps.values():
        for i in range(warmup):
            step(i)
    per_round: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for i in range(period):
                step(1000 + r * period + i)  # 1000: a multiple of every interval used here
            per_round[name].append(1000 * (time.perf_counter() - t0) / period)
    return {name: statistics.median(values) for name, values in per_round.items()}


HEADS = ["model.video.head", "model.text.head", "logit_scale"]
# name -> (virtual_params or None for the plain step, interval, method)
VARIANTS: dict[str, tuple[list[str] | None, int, str]] = {
    "plain (InfoNCE step)": (None, 1, "exact"),
    "exact, all params, every step": ([], 1, "exact"),
    "exact, heads, every step": (HEADS, 1, "exact"),
    "exact, heads, every 2": (HEADS, 2, "exact"),
    "exact, heads, every 4": (HEADS, 4, "exact"),
    "first-order, all params, every step": ([], 1, "first_order"),
    "first-order, heads, every step": (HEADS, 1, "first_order"),
    "first-order, heads, every 2": (HEADS, 2, "first_order"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(None, args.overrides)
    device = torch.device(args.device)
    tokenizer = WordTokenizer.build(WORDS, max_length=cfg.model.max_text_length)
    g = torch.Generator().manual_seed(0)
    train_batch = {k: v.to(device) for k, v in make_batch(cfg, tokenizer, args.batch_size, g).items()}
    meta_batch = {k: v.to(device) for k, v in make_batch(cfg, tokenizer, cfg.meta.batch_size, g).items()}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def runner(prefixes: list[str] | None, interval: int, method: str) -> Callable[[int], None]:
        torch.manual_seed(0)
        module = RetrievalModule(create_model(cfg.model, tokenizer), cfg.loss).to(device)
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
        meta = None
        if prefixes is not None:
            meta_cfg = dataclasses.replace(
                cfg.meta, enabled=True, virtual_params=prefixes, interval=interval, method=method
            )
            meta = MetaWeighting(meta_cfg, module)
            meta.wnet.to(device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        state = TrainState(module, optimizer, scheduler, grad_scaler(device, args.precision), meta)
        settings = StepSettings(precision=args.precision)

        def step(i: int) -> None:
            # The engine's own step (mama.training.step): one shared forward for the meta step and the update.
            meta_now = meta is not None and meta.is_meta_step(i)
            meta_weighted_step(state, train_batch, meta_batch if meta_now else None, i, settings)
            sync()

        return step

    rounds = max(1, args.repeats // 4)
    print(
        f"device {device}, precision {args.precision}, batch {args.batch_size}, meta batch {cfg.meta.batch_size}, "
        f"width {cfg.model.width}, {torch.get_num_threads()} threads; {rounds} interleaved rounds of 4 steps per "
        f"variant after {args.warmup} warm-up steps (median over rounds of the mean step time)"
    )
    steps = {name: runner(prefixes, interval, method) for name, (prefixes, interval, method) in VARIANTS.items()}
    results = time_interleaved(steps, args.warmup, rounds)
    plain = results["plain (InfoNCE step)"]
    for name, ms in results.items():
        print(f"{name:<38} {ms:8.1f} ms/step   x{ms / plain:.2f} of plain")


if __name__ == "__main__":
    main()
